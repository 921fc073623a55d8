"""Tensor-parallel head shards in bytes: which of the model's KV heads a rank holds (vLLM's rule),
where one head lies within a block of a region, and the pieces that copy the heads two shards share.

Pure math on a region's spans and its dims (names and sizes, outer to inner, as `layout` reads them
off the tensors); `layout` turns it into segments and block rows, `tp` into plans between TP groups.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["heads_of", "check_tp", "head_rows", "cut", "shard_pieces", "check_shard_regions", "describe"]

HEAD = "head"


def check_tp(num_kv_heads: int, tp_size: int, tp_rank: int) -> None:
    """ValueError naming the field unless rank `tp_rank` of `tp_size` can hold an even share of
    `num_kv_heads` heads (0: a latent every rank holds whole, as MLA's)."""
    for name, v in (("tp_size", tp_size), ("tp_rank", tp_rank), ("num_kv_heads", num_kv_heads)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if tp_size < 1:
        raise ValueError(f"tp_size must be at least 1, got {tp_size}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range [0, {tp_size}) for tp_size {tp_size}")
    if num_kv_heads < 0:
        raise ValueError(f"num_kv_heads must not be negative, got {num_kv_heads}")
    if 0 < num_kv_heads and tp_size <= num_kv_heads and num_kv_heads % tp_size:
        raise ValueError(f"num_kv_heads {num_kv_heads} is not divisible by tp_size {tp_size}: "
                         "ranks would hold unequal shares of the KV heads")
    if 0 < num_kv_heads < tp_size and tp_size % num_kv_heads:
        raise ValueError(f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}: "
                         "with fewer KV heads than ranks each head must be replicated on as many ranks")


def heads_of(num_kv_heads: int, tp_size: int = 1, tp_rank: int = 0) -> range:
    """The model KV heads rank `tp_rank` of `tp_size` holds: the rank's contiguous share
    `num_kv_heads / tp_size`, or with fewer heads than ranks the one head `tp_size / num_kv_heads`
    ranks hold alike (head `tp_rank // replicas`); empty for a latent (num_kv_heads 0, MLA)."""
    check_tp(num_kv_heads, tp_size, tp_rank)
    if num_kv_heads == 0:
        return range(0)
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return range(tp_rank * per, (tp_rank + 1) * per)
    h = tp_rank // (tp_size // num_kv_heads)
    return range(h, h + 1)


def describe(heads: range, num_kv_heads: int, tp_size: int, tp_rank: int) -> str:
    """'KV heads [2, 4) of 8 (tp rank 1 of 4)', for errors."""
    what = "the whole latent" if num_kv_heads == 0 else f"KV heads [{heads.start}, {heads.stop}) of {num_kv_heads}"
    return f"{what} (tp rank {tp_rank} of {tp_size})"


def _dims(content: Sequence[Any]) -> tuple[list[int], list[str]]:
    sizes = [int(c[1]) if isinstance(c, tuple) else int(c) for c in content]
    names = [str(c[0]) if isinstance(c, tuple) else "" for c in content]
    return sizes, names


def _head_dim(content: Sequence[Any], local: int, where: str) -> int | None:
    """Index of the head dim among a region's dims; None when the rank holds one head (a block is
    that head's; its size-1 dim is not among the dims)."""
    sizes, names = _dims(content)
    if HEAD in names:
        k = names.index(HEAD)
        if sizes[k] != local:
            raise ValueError(f"{where}: its '{HEAD}' dim has {sizes[k]} heads but the shard holds {local}")
        return k
    if local == 1:
        return None
    raise ValueError(f"{where} holds {local} KV heads but no dim is named '{HEAD}', so a head slice cannot be "
                     f"found: pass dim_names= (with '{HEAD}') to KVCacheSpec.from_tensors")


def cut(a_off: np.ndarray, a_len: np.ndarray, b_off: np.ndarray, b_len: np.ndarray) -> np.ndarray:
    """Two lists of memory rows that hold one logical byte stream, split at every boundary of
    either: rows of (offset in a, offset in b, length)."""
    ca = np.concatenate([[0], np.cumsum(a_len)]).astype(np.int64)
    cb = np.concatenate([[0], np.cumsum(b_len)]).astype(np.int64)
    cuts = np.union1d(ca, cb)
    starts, lens = cuts[:-1], np.diff(cuts)
    ia = np.searchsorted(ca, starts, side="right") - 1
    ib = np.searchsorted(cb, starts, side="right") - 1
    return np.stack([a_off[ia] + starts - ca[ia], b_off[ib] + starts - cb[ib], lens], axis=1).astype(np.int64)


def head_rows(spans: Sequence[tuple[int, int]], content: Sequence[Any], local: int, j: int,
              where: str = "region") -> tuple[np.ndarray, np.ndarray]:
    """(offset, length) rows within one block holding the rank's head `j` of `local`, in the order of
    the block's other dims: one row per index of the dims outside the head dim (K/V, tokens in NHD),
    split where the region's spans split."""
    s_off = np.array([o for o, _ in spans], dtype=np.int64)
    s_len = np.array([n for _, n in spans], dtype=np.int64)
    total = int(s_len.sum())
    k = _head_dim(content, local, where)
    if k is None:
        return s_off, s_len
    sizes, _ = _dims(content)
    inner = math.prod(sizes[k + 1:]) * (total // math.prod(sizes))
    n = total // inner
    # the whole stream in head-sized rows, split where the spans split; then this head's rows
    pieces = cut(np.arange(n, dtype=np.int64) * inner, np.full(n, inner, dtype=np.int64), s_off, s_len)
    keep = (pieces[:, 0] // inner) % local == j
    return pieces[keep, 1], pieces[keep, 2]


def _merge(p: np.ndarray) -> np.ndarray:
    """Pieces sorted by source offset, those contiguous on both sides joined."""
    p = p[np.argsort(p[:, 0], kind="stable")]
    if len(p) > 1:
        joins = (p[1:, 0] == p[:-1, 0] + p[:-1, 2]) & (p[1:, 1] == p[:-1, 1] + p[:-1, 2])
        if joins.any():
            starts = np.flatnonzero(np.concatenate(([True], ~joins)))
            p = np.stack([p[starts, 0], p[starts, 1], np.add.reduceat(p[:, 2], starts)], axis=1)
    return p


def shard_pieces(a: Any, a_heads: range, b: Any, b_heads: range) -> np.ndarray:
    """The pieces of one block (rows of offset in a, offset in b, length) that copy the KV heads
    regions `a` (holding `a_heads`) and `b` (holding `b_heads`) share, head by head, in source order
    and joined where both sides are contiguous (one row per K/V plane when heads are outermost)."""
    shared = range(max(a_heads.start, b_heads.start), min(a_heads.stop, b_heads.stop))
    rows = [cut(*head_rows(a.spans, a.content, len(a_heads), h - a_heads.start, "the source region"),
                *head_rows(b.spans, b.content, len(b_heads), h - b_heads.start, "the destination region"))
            for h in shared]
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    return _merge(np.concatenate(rows))


def _others(content: Sequence[Any], local: int, where: str) -> tuple[list[int], list[str]]:
    sizes, names = _dims(content)
    k = _head_dim(content, local, where)
    if k is not None:
        del sizes[k], names[k]
    return sizes, names


def check_shard_regions(i: int, a: Any, a_heads: range, b: Any, b_heads: range, a_layout: str, b_layout: str) -> None:
    """ValueError unless tensor `i` of two shards holds each head the same way: the same bytes per head
    and the same dims outside the head dim, in the same order (the head dim may sit anywhere)."""
    la, lb = len(a_heads), len(b_heads)
    if a.bytes_per_block * lb != b.bytes_per_block * la:
        raise ValueError(f"KV cache mismatch in bytes per KV head per block of tensor {i}: local "
                         f"{a.bytes_per_block // la} vs peer {b.bytes_per_block // lb}")
    sa, na = _others(a.content, la, f"tensor {i} of the local spec")
    sb, nb = _others(b.content, lb, f"tensor {i} of the peer's spec")
    if sa != sb or (all(na) and all(nb) and na != nb):
        raise ValueError(f"KV cache mismatch in the byte order of one head of tensor {i}: local layout "
                         f"{a_layout!r} {list(a.content)} vs peer {b_layout!r} {list(b.content)}; "
                         "the dims other than the head dim must match in order")
