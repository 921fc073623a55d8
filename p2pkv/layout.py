"""KV cache layouts: what one block of an engine's KV memory looks like, and the
byte segments that move a request's blocks from P's memory into D's.

A `KVCacheSpec` is read off the engine's own tensors (shapes *and* strides), so
it follows whatever layout the engine chose; `plan_segments` turns block ids into
as few (region, src offset, dst offset, length) segments as the runs allow. A spec
may be one tensor-parallel rank's shard of the heads (`tp_size`, `tp_rank`): plans
between shards move the heads both hold (`p2pkv.heads`; which ranks: `p2pkv.tp`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from p2pkv.heads import HEAD, check_shard_regions, check_tp, cut, describe, heads_of, shard_pieces
from p2pkv.segments import BlockPlan, Segments

__all__ = ["KVCacheSpec", "RegionSpec", "PRESETS", "make_kv_caches", "plan_segments", "block_ids", "block_geometry",
           "BlockRows", "merge_rows", "dtype_from_name"]

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "uint8": torch.uint8, "int8": torch.int8,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.update({"float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn})


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """Map 'bf16', 'float16', 'fp8', ... to a torch dtype, or raise a ValueError listing the choices."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(set(_DTYPES))}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RegionSpec:
    """One registered tensor: `num_blocks` blocks `block_stride` bytes apart, each
    block owning the byte spans `(offset, length)` listed in memory order."""

    nbytes: int
    num_blocks: int
    block_stride: int
    spans: tuple[tuple[int, int], ...]
    content: tuple[Any, ...]

    @property
    def bytes_per_block(self) -> int:
        return sum(length for _, length in self.spans)

    def to_dict(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "num_blocks": self.num_blocks, "block_stride": self.block_stride,
                "spans": [list(s) for s in self.spans], "content": [list(c) if isinstance(c, tuple) else c for c in self.content]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RegionSpec":
        return cls(int(d["nbytes"]), int(d["num_blocks"]), int(d["block_stride"]),
                   tuple((int(o), int(n)) for o, n in d["spans"]),
                   tuple(tuple(c) if isinstance(c, list) else c for c in d["content"]))


@dataclass(frozen=True)
class KVCacheSpec:
    """What a set of registered KV tensors looks like, in bytes, plus the model
    fields the handshake compares (dtype, block size, heads, head size, layers).

    `num_kv_heads` counts the model's KV heads (0: a latent, as MLA's); a tensor-parallel
    rank's tensors hold `heads`, its share: rank `tp_rank` of `tp_size` (see `heads_of`)."""

    regions: tuple[RegionSpec, ...]
    dtype: str
    block_size: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    num_layers: int = 0
    layout: str = "custom"
    extra: Mapping[str, Any] = field(default_factory=dict)
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        check_tp(self.num_kv_heads, self.tp_size, self.tp_rank)
        local = len(self.heads)
        for i, r in enumerate(self.regions):
            sizes = [c[1] for c in r.content if isinstance(c, tuple) and c[0] == HEAD]
            if local and sizes and sizes[0] != local:
                raise ValueError(f"KV tensor {i} has {sizes[0]} heads in its '{HEAD}' dim, but this rank holds "
                                 f"{local}: {describe(self.heads, self.num_kv_heads, self.tp_size, self.tp_rank)}; "
                                 "num_kv_heads is the model's, tp_size/tp_rank pick this rank's share")

    @property
    def heads(self) -> range:
        """The model KV heads this spec's tensors hold (empty for a latent, which every rank holds whole)."""
        return heads_of(self.num_kv_heads, self.tp_size, self.tp_rank)

    @property
    def num_blocks(self) -> int:
        return min(r.num_blocks for r in self.regions)

    @property
    def bytes_per_block(self) -> int:
        """Payload bytes one block holds across every region (all layers, K and V)."""
        return sum(r.bytes_per_block for r in self.regions)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor] | torch.Tensor, *, num_blocks: int | None = None,
                     block_dim: int | None = None, dim_names: Sequence[str] | None = None, block_size: int = 0,
                     num_kv_heads: int = 0, head_size: int = 0, num_layers: int | None = None,
                     layout: str = "custom", tp_size: int = 1, tp_rank: int = 0) -> "KVCacheSpec":
        """Describe the engine's tensors as they are (never a reshaped copy).

        `block_dim` is the dim that indexes blocks; without it, the one dim of size
        `num_blocks` is used. `dim_names` names every dim (including the block dim)
        so that two layouts are compared by meaning, not only by sizes; a TP shard that
        holds several heads needs its head dim named 'head' to be read by ranks of another
        TP size. `num_kv_heads` is the model's; the tensors hold rank `tp_rank`'s share.
        """
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        tensors = list(tensors)
        if not tensors:
            raise ValueError("no KV tensors given")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"KV tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"KV tensors have mixed dtypes {sorted(map(str, dtypes))}; register one dtype per spec")
        devices = {str(t.device) for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"KV tensors live on several devices {sorted(devices)}; register one device per transport")
        regions = tuple(_region_of(t, i, num_blocks, block_dim, dim_names) for i, t in enumerate(tensors))
        if len({r.num_blocks for r in regions}) != 1:
            raise ValueError(f"KV tensors disagree on the number of blocks: {[r.num_blocks for r in regions]}")
        return cls(regions, _dtype_name(tensors[0].dtype), block_size, num_kv_heads, head_size,
                   len(tensors) if num_layers is None else num_layers, layout, tp_size=tp_size, tp_rank=tp_rank)

    def to_dict(self) -> dict[str, Any]:
        return {"regions": [r.to_dict() for r in self.regions], "dtype": self.dtype, "block_size": self.block_size,
                "num_kv_heads": self.num_kv_heads, "head_size": self.head_size, "num_layers": self.num_layers,
                "layout": self.layout, "tp_size": self.tp_size, "tp_rank": self.tp_rank}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVCacheSpec":
        try:
            return cls(tuple(RegionSpec.from_dict(r) for r in d["regions"]), str(d["dtype"]), int(d["block_size"]),
                       int(d["num_kv_heads"]), int(d["head_size"]), int(d["num_layers"]), str(d["layout"]),
                       tp_size=int(d.get("tp_size", 1)), tp_rank=int(d.get("tp_rank", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed KV cache spec: {e!r}") from None

    def check_compatible(self, other: "KVCacheSpec") -> None:
        """Raise a ValueError naming the first field where a byte copy from `self` into
        `other` (or back) would not be correct: of whole blocks when both hold the same
        heads in the same byte order, else head by head, of the KV heads both hold (shards
        of one model at other TP sizes, or heads inside tokens on one side only: NHD, HND)."""
        for name in ("dtype", "block_size", "num_kv_heads", "head_size", "num_layers"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b and a and b:
                raise ValueError(f"KV cache mismatch in {name}: local {a!r} vs peer {b!r}")
        if len(self.regions) != len(other.regions):
            raise ValueError(f"KV cache mismatch in number of registered tensors: local {len(self.regions)} "
                             f"vs peer {len(other.regions)}")
        if self.heads != other.heads or (self.heads and not _same_order(self, other)):
            self._check_shards(other)
            return
        for i, (a, b) in enumerate(zip(self.regions, other.regions)):
            if a.bytes_per_block != b.bytes_per_block:
                hint = ("; shards of other TP sizes need num_kv_heads (the model's) to find their common heads"
                        if self.tp_size != other.tp_size else "")
                raise ValueError(f"KV cache mismatch in bytes per block of tensor {i}: local {a.bytes_per_block} "
                                 f"vs peer {b.bytes_per_block}{hint}")
            if _strip_names(a.content) != _strip_names(b.content) or (_names(a.content) and _names(b.content) and a.content != b.content):
                raise ValueError(f"KV cache mismatch in the byte order of one block of tensor {i}: local layout "
                                 f"{self.layout!r} {list(a.content)} vs peer {other.layout!r} {list(b.content)}; "
                                 "a byte copy between them would scramble heads/tokens")

    def _check_shards(self, other: "KVCacheSpec") -> None:
        """Head by head: the same model, some head in common, each head's bytes in the same order."""
        mine = describe(self.heads, self.num_kv_heads, self.tp_size, self.tp_rank)
        theirs = describe(other.heads, other.num_kv_heads, other.tp_size, other.tp_rank)
        if not (self.num_kv_heads and other.num_kv_heads):
            raise ValueError(f"KV cache mismatch in num_kv_heads: local holds {mine}, peer {theirs}; shards of "
                             "a model's heads need num_kv_heads (the model's) on both sides")
        if not range(max(self.heads.start, other.heads.start), min(self.heads.stop, other.heads.stop)):
            raise ValueError(f"KV cache mismatch in tp_rank: local holds {mine}, peer {theirs}: no KV head in "
                             "common; pair the ranks that p2pkv.tp.tp_plan names")
        for i, (a, b) in enumerate(zip(self.regions, other.regions)):
            check_shard_regions(i, a, self.heads, b, other.heads, self.layout, other.layout)


def _same_order(a: KVCacheSpec, b: KVCacheSpec) -> bool:
    """Whether every block of `a` and `b` lists the same dims in the same order (whole blocks copy as bytes)."""
    return all(_strip_names(x.content) == _strip_names(y.content)
               and not (_names(x.content) and _names(y.content) and x.content != y.content)
               for x, y in zip(a.regions, b.regions))


def _names(content: tuple[Any, ...]) -> bool:
    return all(isinstance(c, tuple) and c[0] for c in content)


def _strip_names(content: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(int(c[1]) if isinstance(c, tuple) else int(c) for c in content)


def _region_of(t: torch.Tensor, index: int, num_blocks: int | None, block_dim: int | None,
               dim_names: Sequence[str] | None) -> RegionSpec:
    where = f"KV tensor {index} (shape {list(t.shape)}, strides {list(t.stride())})"
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{where} is not a strided dense tensor")
    if t.dim() == 0:
        raise ValueError(f"{where} has no block dim")
    if t.numel() == 0:
        raise ValueError(f"{where} is empty: every dim must have a positive size")
    if dim_names is not None and len(dim_names) != t.dim():
        raise ValueError(f"{where}: dim_names {list(dim_names)} must name all {t.dim()} dims")
    if block_dim is None:
        if num_blocks is None:
            raise ValueError(f"{where}: pass block_dim= or num_blocks= so the block dim can be found")
        cands = [d for d, s in enumerate(t.shape) if s == num_blocks]
        if len(cands) != 1:
            raise ValueError(f"{where}: cannot tell the block dim: {len(cands)} dims have size {num_blocks}; pass block_dim=")
        block_dim = cands[0]
    if not isinstance(block_dim, (int, np.integer)) or not -t.dim() <= block_dim < t.dim():
        raise ValueError(f"{where}: block_dim {block_dim!r} is not a dim of a {t.dim()}-dim tensor; "
                         f"pass an int in [{-t.dim()}, {t.dim()})")
    block_dim = int(block_dim) % t.dim()
    if num_blocks is not None and t.shape[block_dim] != num_blocks:
        raise ValueError(f"{where}: dim {block_dim} has {t.shape[block_dim]} blocks, expected {num_blocks}")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{where} has a negative stride")
    esz = t.element_size()
    nb = t.shape[block_dim]
    bstride = t.stride(block_dim) * esz
    inner = [(t.shape[d], t.stride(d) * esz, dim_names[d] if dim_names else "") for d in range(t.dim())
             if d != block_dim and t.shape[d] != 1]
    inner.sort(key=lambda x: -x[1])
    # Fold the innermost dims into one contiguous run; what stays outside enumerates the spans.
    run, k = esz, len(inner)
    while k > 0 and inner[k - 1][1] == run:
        run *= inner[k - 1][0]
        k -= 1
    outer = inner[:k]
    offsets = np.zeros(1, dtype=np.int64)
    for size, stride, _ in outer:
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
    offsets.sort()
    if len(offsets) > 1 and np.any(np.diff(offsets) < run):
        raise ValueError(f"{where} is not contiguous within a block: its elements overlap or interleave "
                         "(a transposed or expanded view); register the engine's own storage instead")
    if nb > 1 and bstride == 0:
        raise ValueError(f"{where}: blocks share memory (block stride 0, an expanded tensor)")
    extent = int(offsets[-1]) + run if nb == 1 else int(offsets[-1]) + run + (nb - 1) * bstride
    if nb > 1:
        within_block = int(offsets[-1]) + run <= bstride
        planes = run <= bstride and (len(offsets) == 1 or np.all(np.diff(offsets) >= (nb - 1) * bstride + run))
        if not (within_block or planes):
            raise ValueError(f"{where}: blocks overlap each other in memory (block stride {bstride} bytes is "
                             f"smaller than what one block owns); this is not a paged KV cache layout")
    content = tuple((n, s) if n else s for s, _, n in inner)
    spans = tuple((int(o), run) for o in offsets)
    return RegionSpec(extent, nb, bstride, spans, content)


def _pieces(a: RegionSpec, b: RegionSpec) -> np.ndarray:
    """Split one block's logical byte stream at every span boundary of either side:
    rows of (offset in a's block, offset in b's block, length)."""
    def rows(r: RegionSpec) -> tuple[np.ndarray, np.ndarray]:
        return np.array([o for o, _ in r.spans], dtype=np.int64), np.array([n for _, n in r.spans], dtype=np.int64)
    return cut(*rows(a), *rows(b))


_PIECES: dict[tuple[int, int], tuple[KVCacheSpec, KVCacheSpec, list[np.ndarray]]] = {}


def _spec_pieces(src: KVCacheSpec, dst: KVCacheSpec) -> list[np.ndarray]:
    """`_pieces` of every region pair of two specs, kept for the last few spec pairs (a request is
    planned between the same two specs again and again; the entry holds both, so ids stay theirs)."""
    hit = _PIECES.get((id(src), id(dst)))
    if hit is not None and hit[0] is src and hit[1] is dst:
        return hit[2]
    if src.heads == dst.heads and (not src.heads or _same_order(src, dst)):
        pieces = [_pieces(a, b) for a, b in zip(src.regions, dst.regions)]
    else:
        pieces = [shard_pieces(a, src.heads, b, dst.heads) for a, b in zip(src.regions, dst.regions)]
    if len(_PIECES) >= 32:
        _PIECES.pop(next(iter(_PIECES)))
    _PIECES[(id(src), id(dst))] = (src, dst, pieces)
    return pieces


_PASS_IDS = "pass block ids (not a mask) as a list of ints or a 1-D integer numpy array or torch tensor"


def block_ids(ids: Any, what: str, num_blocks: int | None = None, *, distinct: bool = False,
              scalar: bool = True) -> np.ndarray:
    """`ids` as a flat int64 array of block ids (in [0, num_blocks) when given, else non-negative), or a
    ValueError whose message starts with `what` ('source block', ...) and says what is wrong. `distinct`
    refuses a repeated id (two blocks cannot land in one); `scalar=False` refuses a single int."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(f"{what} ids must be integers, got {ids.dtype}; {_PASS_IDS}")
        ids = ids.detach().cpu().numpy()
    try:
        a = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} ids are not a flat sequence of integers ({e}); {_PASS_IDS}") from None
    if a.dtype.kind not in "iu" and a.size:
        odd = [x for x in a.flat if not isinstance(x, (int, np.integer))] if a.dtype == object else [a]
        if odd:
            got = f"dtype {a.dtype}" if odd[0] is a else f"{type(odd[0]).__name__} {odd[0]!r}"
            raise ValueError(f"{what} ids must be integers, got {got}; {_PASS_IDS}")
    if a.ndim > 1 or (a.ndim == 0 and not scalar):
        raise ValueError(f"{what} ids must be one-dimensional, got shape {a.shape}; {_PASS_IDS}")
    a = a.reshape(-1)
    if a.size and (a.min() < 0 or (num_blocks is not None and a.max() >= num_blocks)):
        bad = next(x for x in a.tolist() if x < 0 or (num_blocks is not None and x >= num_blocks))
        raise ValueError(f"{what} id {bad} " + (f"out of range [0, {num_blocks})" if num_blocks is not None
                                                 else "is negative"))
    a = a.astype(np.int64, copy=False)
    if distinct and len(np.unique(a)) != len(a):
        u, c = np.unique(a, return_counts=True)
        raise ValueError(f"duplicate {what} id {int(u[c > 1][0])}: two blocks cannot land in one")
    return a


def plan_segments(src: KVCacheSpec, dst: KVCacheSpec, src_blocks: Sequence[int] | np.ndarray | torch.Tensor,
                  dst_blocks: Sequence[int] | np.ndarray | torch.Tensor, *, check: bool = True) -> Segments:
    """The byte segments that copy `src_blocks` of `src` into `dst_blocks` of `dst`.

    Block ids are lists of ints or 1-D integer numpy arrays or torch tensors; a source
    id may repeat, a destination id may not. Vectorised over blocks, spans and regions;
    runs contiguous on both sides are merged, so consecutive blocks cost one segment
    per region and span.
    """
    if check:
        src.check_compatible(dst)
    s = block_ids(src_blocks, "source block", src.num_blocks)
    d = block_ids(dst_blocks, "destination block", dst.num_blocks, distinct=True)
    if len(s) != len(d):
        raise ValueError(f"block id lists differ in length: {len(s)} source ids vs {len(d)} destination ids")
    if len(s) == 0:
        return Segments.empty()
    parts = []
    for ri, (ra, rb, pc) in enumerate(zip(src.regions, dst.regions, _spec_pieces(src, dst))):
        so = (s[None, :] * ra.block_stride + pc[:, 0:1]).reshape(-1)
        do = (d[None, :] * rb.block_stride + pc[:, 1:2]).reshape(-1)
        ln = np.repeat(pc[:, 2], len(s))
        parts.append((np.full(len(so), ri, dtype=np.int64), so, do, ln))
    region = np.concatenate([p[0] for p in parts])
    so = np.concatenate([p[1] for p in parts])
    do = np.concatenate([p[2] for p in parts])
    ln = np.concatenate([p[3] for p in parts])
    order = np.lexsort((so, region))
    region, so, do, ln = region[order], so[order], do[order], ln[order]
    joins = (region[1:] == region[:-1]) & (so[:-1] + ln[:-1] == so[1:]) & (do[:-1] + ln[:-1] == do[1:])
    starts = np.concatenate([[True], ~joins])
    idx = np.flatnonzero(starts)
    total = np.add.reduceat(ln, idx)
    return Segments(region[idx].astype(np.int32), so[idx], do[idx], total, BlockPlan(src, dst, s, d))


def block_geometry(src: KVCacheSpec, dst: KVCacheSpec) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per region pair: the source and destination block strides and the pieces of one block
    (rows of src offset, dst offset, length): what a device copy needs to move whole blocks
    given only their ids (the same bytes `plan_segments` would list)."""
    src.check_compatible(dst)
    ss = np.array([r.block_stride for r in src.regions], dtype=np.int64)
    ds = np.array([r.block_stride for r in dst.regions], dtype=np.int64)
    return ss, ds, _spec_pieces(src, dst)


def merge_rows(addr: np.ndarray, length: np.ndarray) -> np.ndarray:
    """(address, length) rows as a (n, 2) uintp array, rows that follow each other in
    memory merged into one: a plan merges runs contiguous on both sides, but a byte
    stream lets each side merge its own, and every row costs the kernel."""
    if len(addr) > 1:
        joins = addr[1:] == addr[:-1] + length[:-1]
        if joins.any():
            starts = np.flatnonzero(np.concatenate(([True], ~joins)))
            addr, length = addr[starts], np.add.reduceat(length, starts)
    out = np.empty((len(addr), 2), dtype=np.uintp)
    out[:, 0] = addr
    out[:, 1] = length
    return out


class BlockRows:
    """The byte rows of whole blocks between two specs, from block ids alone, in one canonical
    order that both ends of a link compute the same way: region, then piece of a block, then the
    ids in the order given. Lets a request carry block ids instead of a segment table; built once
    per spec pair (the geometry), then each request is a few vectorised steps."""

    def __init__(self, src: KVCacheSpec, dst: KVCacheSpec):
        ss, ds, pieces = block_geometry(src, dst)
        self.num_blocks = (src.num_blocks, dst.num_blocks)
        self.num_regions = len(pieces)
        self._uniform = len({len(p) for p in pieces}) == 1
        self._stride = (ss, ds)
        self._pieces = pieces
        self._block_bytes = sum(int(p[:, 2].sum()) for p in pieces)
        self._block_rows = sum(len(p) for p in pieces)
        self._addr: dict[tuple, tuple] = {}  # iovecs' per-region part, by (side, regions, bases)
        if self._uniform:
            self._stack = np.stack(pieces)  # (regions, pieces, 3)
            self._all = np.arange(len(pieces))
        for r, (a, b, pc) in enumerate(zip(src.regions, dst.regions, pieces)):
            for side, reg, col, stride in ((0, a, 0, ss[r]), (1, b, 1, ds[r])):
                end = (reg.num_blocks - 1) * int(stride) + int((pc[:, col] + pc[:, 2]).max())
                if end > reg.nbytes:
                    raise ValueError(f"region {r} of the {'source' if side == 0 else 'destination'} spec: its last "
                                     f"block ends at byte {end}, past its {reg.nbytes} bytes")

    def nbytes(self, count: int, regions: Sequence[int] | None = None) -> int:
        """Bytes that `count` blocks move in these regions (all when None)."""
        per = self._block_bytes if regions is None else sum(int(self._pieces[r][:, 2].sum()) for r in regions)
        return count * per

    def rows_per_block(self, regions: Sequence[int] | None = None) -> int:
        """How many rows one block makes in these regions (all when None), before merging."""
        if regions is None:
            return self._block_rows
        return sum(len(self._pieces[int(r)]) for r in regions)

    def check_row_limit(self, count: int, regions: Sequence[int] | None, limit: int) -> None:
        """ValueError if `count` blocks in these regions expand to more than `limit` rows: what a
        few bytes of ids may make either side allocate."""
        per = self.rows_per_block(regions)
        if count * per > limit:
            raise ValueError(f"{count} blocks of {per} rows each exceed the limit of {limit} rows per request: "
                             f"split the request")

    def check_ids(self, ids: np.ndarray, side: str) -> None:
        """ValueError unless every id names a block of that side ('src' or 'dst')."""
        n = self.num_blocks[side == "dst"]
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n):
            bad = ids[(ids < 0) | (ids >= n)]
            raise ValueError(f"{'source' if side == 'src' else 'destination'} block id {int(bad[0])} "
                             f"out of range [0, {n})")

    def check_regions(self, regions: Sequence[int] | None) -> None:
        if regions is not None and any(not 0 <= int(r) < self.num_regions for r in regions):
            raise ValueError(f"regions {list(regions)} name one outside the {self.num_regions} registered")

    def iovecs(self, ids: np.ndarray, side: str, regions: Sequence[int] | None, bases: np.ndarray) -> np.ndarray:
        """The rows of these blocks on one side as (address, length) uintp rows, `bases[r]` being
        where region r starts, with rows that follow each other in this side's memory merged: what
        a transport hands the kernel. Where every piece fills its block stride (each block one run
        per piece), runs of consecutive ids are found once on the ids and the rows built already
        merged, in a few steps on arrays of ids rather than of rows; otherwise `merge_rows` does it
        on the rows."""
        col = 0 if side == "src" else 1
        if not self._uniform:
            region, off, length = self.rows(ids, side, regions)
            return merge_rows(bases[region] + off.astype(np.uintp), length.astype(np.uintp))
        key = (col, regions if regions is None or isinstance(regions, tuple) else tuple(regions), id(bases))
        cached = self._addr.get(key)
        if cached is None:
            sel = self._all if regions is None else np.asarray(regions, dtype=np.int64)
            pcs = self._stack[sel]
            start = (bases[sel][:, None] + pcs[:, :, col].astype(np.uintp))[:, :, None]
            stride = self._stride[col][sel].astype(np.uintp)[:, None, None]
            plen = pcs[:, :, 2].astype(np.uintp)[:, :, None]
            dense = bool((plen == stride).all())
            cached = self._addr[key] = (start, stride, plen, dense, bases)
            if len(self._addr) > 64:
                self._addr.pop(next(iter(self._addr)))
        start, stride, plen, dense, _ = cached  # the entry holds `bases`, so its id stays its own
        ids = np.asarray(ids).astype(np.uintp)
        if dense and len(ids) > 1:
            brk = np.flatnonzero(ids[1:] != ids[:-1] + np.uintp(1)) + 1
            if len(brk) < len(ids) - 1:
                first = np.concatenate(([0], brk))
                runs = np.diff(np.concatenate((first, [len(ids)]))).astype(np.uintp)
                out = np.empty(start.shape[:2] + (len(first), 2), dtype=np.uintp)
                out[..., 0] = start + ids[first][None, None, :] * stride
                out[..., 1] = runs[None, None, :] * plen
                return out.reshape(-1, 2)
        out = np.empty(start.shape[:2] + (len(ids), 2), dtype=np.uintp)
        out[..., 0] = start + ids[None, None, :] * stride
        out[..., 1] = plen
        if dense:  # no consecutive ids, so no row follows another within a region and piece
            return out.reshape(-1, 2)
        return merge_rows(out[..., 0].reshape(-1), out[..., 1].reshape(-1))

    def rows(self, ids: np.ndarray, side: str, regions: Sequence[int] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(region, offset, length) of these blocks on one side ('src' or 'dst'), in the canonical
        order; ids must have passed `check_ids`."""
        col = 0 if side == "src" else 1
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if self._uniform:
            if regions is None:
                sel, pcs, stride = self._all, self._stack, self._stride[col]
            else:
                sel = np.asarray(regions, dtype=np.int64)
                pcs, stride = self._stack[sel], self._stride[col][sel]
            off = (pcs[:, :, col, None] + ids[None, None, :] * stride[:, None, None]).reshape(-1)
            length = np.repeat(pcs[:, :, 2].reshape(-1), n)
            region = np.repeat(sel, pcs.shape[1] * n)
            return region, off, length
        parts = []
        for r in (range(self.num_regions) if regions is None else [int(r) for r in regions]):
            pc = self._pieces[r]
            off = (pc[:, col, None] + ids[None, :] * self._stride[col][r]).reshape(-1)
            parts.append((np.full(len(off), r, dtype=np.int64), off, np.repeat(pc[:, 2], n)))
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z
        return tuple(np.concatenate(x) for x in zip(*parts))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- presets

PRESETS = ("vllm", "vllm_cpu", "block_first", "mla", "cross_layer")


def make_kv_caches(layout: str, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int, dtype: str | torch.dtype = "bf16", device: str | torch.device = "cpu",
                   fill: str = "empty", generator: torch.Generator | None = None, tp_size: int = 1, tp_rank: int = 0,
                   kv_layout: str = "NHD") -> tuple[list[torch.Tensor], KVCacheSpec]:
    """Allocate a paged KV cache in one of the named layouts (as one buffer split
    per layer, like engines do) and return the tensors with their spec.

    `num_kv_heads` is the model's; rank `tp_rank` of `tp_size` gets its share of them
    (`heads_of`; MLA's latent whole on every rank). `kv_layout="HND"` puts heads outside
    tokens in memory within each block of the `vllm` layout (the shape stays
    [2, N, B, H, D], as vLLM's HND), so a head slice is one span per block and K/V plane."""
    dt = dtype_from_name(dtype)
    L, N, B, H, D = num_layers, num_blocks, block_size, num_kv_heads, head_size
    if min(L, N, B, H, D) <= 0:
        raise ValueError(f"every cache dim must be positive: layers={L} blocks={N} block_size={B} heads={H} head_size={D}")
    if kv_layout not in ("NHD", "HND") or (kv_layout == "HND" and layout != "vllm"):
        raise ValueError(f"kv_layout {kv_layout!r}: choose 'NHD', or 'HND' with the 'vllm' layout")
    model_heads = 0 if layout == "mla" else H
    if model_heads:
        H = len(heads_of(model_heads, tp_size, tp_rank))
    else:
        check_tp(0, tp_size, tp_rank)
    order = None
    if layout == "vllm":
        shape, names, bdim = (2, N, B, H, D), ("kv", "block", "token", "head", "dim"), 1
        if kv_layout == "HND":
            shape, order = (2, N, H, B, D), (0, 1, 3, 2, 4)
    elif layout == "vllm_cpu":
        shape, names, bdim = (N, H, B, 2 * D), ("block", "head", "token", "kvdim"), 0
    elif layout == "block_first":
        shape, names, bdim = (N, 2, B, H, D), ("block", "kv", "token", "head", "dim"), 0
    elif layout == "mla":
        shape, names, bdim = (N, B, D), ("block", "token", "dim"), 0
    elif layout == "cross_layer":
        shape, names, bdim = (N, L, 2, B, H, D), ("block", "layer", "kv", "token", "head", "dim"), 0
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(PRESETS)}")
    per = math.prod(shape)
    n = 1 if layout == "cross_layer" else L
    flat = torch.empty(per * n, dtype=dt, device=device)
    if fill == "random":
        _fill_random(flat, generator)
    elif fill == "zeros":
        flat.view(torch.uint8).zero_()
    tensors = [flat[i * per:(i + 1) * per].view(shape) for i in range(n)]
    if order is not None:
        tensors = [t.permute(order) for t in tensors]
    spec = KVCacheSpec.from_tensors(tensors, block_dim=bdim, dim_names=names, block_size=B, num_kv_heads=model_heads,
                                    head_size=D, num_layers=L, tp_size=tp_size, tp_rank=tp_rank,
                                    layout=layout if order is None else "vllm_hnd")
    return tensors, spec


def _fill_random(t: torch.Tensor, generator: torch.Generator | None) -> None:
    b = t.view(torch.uint8)
    b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=generator, device="cpu").to(b.device))
