"""Segment copies on the device: gather many blocks of many layers into one buffer,
scatter them back, or copy segments between two sets of base pointers, each in one
CUDA launch (csrc/, built with torch's cpp_extension ahead of time by
`python -m p2pkv.kernels build` or at first use), with a pure-torch fallback that
gives the same bytes wherever the extension is not built (CPU machines)."""
from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["Regions", "BlockTable", "gather", "scatter", "copy_segments", "copy_blocks", "launch", "launch_blocks",
           "block_args",
           "load", "available", "unavailable_reason", "TUNING"]

log = logging.getLogger("p2pkv.kernels")

# Knobs of the extension path (the microbench in bench/ sweeps them): `hint` bit 0 streaming
# loads/stores, bit 1 eight 16-byte loads in flight per thread (measured best on the H100), bit 3 one
# warp per whole-block unit of 4 KiB and less instead of a thread block (copy_warp_blocks_kernel:
# 0.85-0.88 of cudaMemcpy's GPU time for 4 KiB units on the H100, against 0.66-0.68); row sizes;
# whether tables of up to SMALL_ROWS rows travel inside the kernel's parameters; the grid (0: 8
# blocks per multiprocessor, -k: k per multiprocessor); `table_rows` (cap each launch's table, so
# long requests take several launches: for tests) and `dry` (host work only, nothing launched: to
# time the host side).
class _Tuning(dict):
    """The knobs, with a version that changes on every write, so launch arguments built from them can
    be cached by the transports and rebuilt only when a knob moves."""

    version = 0

    def _bump(self) -> None:
        _Tuning.version += 1

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._bump()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._bump()

    def update(self, *a: Any, **k: Any) -> None:
        super().update(*a, **k)
        self._bump()

    def clear(self) -> None:
        super().clear()
        self._bump()

    def pop(self, *a: Any) -> Any:
        self._bump()
        return super().pop(*a)


TUNING: dict[str, Any] = _Tuning({"hint": int(os.environ.get("P2PKV_HINT", "10")),
                          "min_chunk": 4096, "max_chunk": 65536, "small": os.environ.get("P2PKV_SMALL", "1") == "1",
                          "grid": int(os.environ.get("P2PKV_GRID", "0")), "first_piece": 256, "max_piece": 16384,
                          "sides": 2, "blocks": os.environ.get("P2PKV_BLOCKS", "1") == "1",
                          "block_min_chunk": 4096, "block_max_chunk": 32768, "block_grid": 1 << 30})

_ext: Any = None
_ext_error: str | None = None
_ext_tried = False
_ext_lock = threading.Lock()


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (os.environ.get("P2PKV_CSRC"), here.parent / "csrc", here / "csrc"):
        if cand and (Path(cand) / "kv_copy.cu").is_file():
            return Path(cand)
    raise FileNotFoundError("the CUDA sources (csrc/kv_copy.cu) are not shipped with this p2pkv install")


def _build_dir() -> Path:
    cuda = (torch.version.cuda or "none").replace(".", "")
    default = Path.home() / ".cache" / "p2pkv" / f"ext-torch{torch.__version__.split('+')[0]}-cu{cuda}"
    return Path(os.environ.get("P2PKV_EXT_DIR", default))


def _arch_flags() -> list[str]:
    flags = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) != (9, 0):
            flags.append(f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}")
    return flags


def load(build: bool = True, verbose: bool = False) -> Any:
    """The compiled extension, building it on first use when nvcc is here; None (and
    `unavailable_reason()` says why) where it cannot be had. P2PKV_NO_EXT=1 forces None."""
    global _ext, _ext_error, _ext_tried
    if _ext is not None or (_ext_tried and not build):
        return _ext
    with _ext_lock:
        if _ext is not None or _ext_tried:
            return _ext
        _ext_tried = True
        if os.environ.get("P2PKV_NO_EXT") == "1":
            _ext_error = "disabled by P2PKV_NO_EXT=1"
            return None
        if not torch.cuda.is_available() or torch.version.cuda is None:
            _ext_error = "torch sees no CUDA device here"
            return None
        try:
            from torch.utils.cpp_extension import CUDA_HOME, load as cpp_load
            if CUDA_HOME is None:
                raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
            src = _csrc_dir()
            out = _build_dir()
            out.mkdir(parents=True, exist_ok=True)
            _ext = cpp_load(name="p2pkv_cuda", sources=[str(src / "binding.cpp"), str(src / "kv_copy.cu")],
                            extra_include_paths=[str(src)], extra_cflags=["-O3"],
                            extra_cuda_cflags=["-O3", *_arch_flags()], build_directory=str(out),
                            verbose=verbose)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback, say why
            _ext_error = f"{type(e).__name__}: {e}"
            log.warning("p2pkv CUDA extension unavailable, using the torch fallback: %s", _ext_error)
            return None
        return _ext


def build_state() -> str:
    """Where the CUDA kernels stand here, without building them (for `p2pkv doctor`)."""
    if os.environ.get("P2PKV_NO_EXT") == "1":
        return "CUDA kernels disabled by P2PKV_NO_EXT=1 (torch fallback)"
    if _ext is not None:
        return "CUDA kernels loaded"
    try:
        src = _csrc_dir()
    except FileNotFoundError as e:
        return f"{e} (torch fallback)"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "no CUDA toolkit (set CUDA_HOME or put nvcc on PATH), so copies use the torch fallback"
    built = _build_dir() / "p2pkv_cuda.so"
    if built.is_file():
        return f"CUDA kernels built ({built})"
    return f"CUDA kernels compile from {src} with {CUDA_HOME}/bin/nvcc on first use"


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _ext_error


# ----------------------------------------------------------------------------------------- regions

def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8 and t.dim() == 1:
        return t
    if not t.is_contiguous():
        raise ValueError(f"a region must be contiguous bytes; got a tensor of shape {list(t.shape)} with strides "
                         f"{list(t.stride())} (pass transport.byte_regions(...) views)")
    return t.reshape(-1).view(torch.uint8)


class _CudaArray:
    """A raw device pointer seen as a uint8 array, so torch can wrap IPC-mapped memory."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (int(nbytes),), "typestr": "|u1", "data": (int(ptr), False),
                                         "version": 3, "strides": None}


@dataclass
class Regions:
    """Byte regions as base addresses and sizes (what the kernels read), with torch views
    of them (what the fallback and lifetimes use)."""

    ptrs: np.ndarray
    sizes: np.ndarray
    device: torch.device
    _tensors: list[torch.Tensor] | None = field(default=None, repr=False)
    _pairs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor] | "Regions") -> "Regions":
        if isinstance(tensors, Regions):
            return tensors
        ts = [_as_bytes(t) for t in tensors]
        if not ts:
            raise ValueError("no regions given")
        devs = {t.device for t in ts}
        if len(devs) != 1:
            raise ValueError(f"regions live on several devices {sorted(map(str, devs))}")
        return cls(np.array([t.data_ptr() for t in ts], dtype=np.int64), np.array([t.numel() for t in ts], dtype=np.int64),
                   ts[0].device, ts)

    @classmethod
    def from_ptrs(cls, ptrs: Sequence[int], sizes: Sequence[int], device: torch.device | str) -> "Regions":
        """Regions at raw device addresses (e.g. a peer's IPC-mapped memory)."""
        return cls(np.asarray(ptrs, dtype=np.int64), np.asarray(sizes, dtype=np.int64), torch.device(device))

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            with torch.cuda.device(self.device):
                self._tensors = [torch.as_tensor(_CudaArray(p, n), device=self.device)
                                 for p, n in zip(self.ptrs.tolist(), self.sizes.tolist())]
        return self._tensors

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


# ----------------------------------------------------------------------------------------- tables

class _TablePool:
    """Pinned row tables, each reused once the launches that read it are done (its event)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: list[list[Any]] = []  # [pinned tensor, rows capacity, event]
        self.next = 0
        self.lock = threading.Lock()

    def acquire(self, rows: int, row_bytes: int, exact: bool = False) -> list[Any]:
        for _ in range(len(self.slots)):
            slot = self.slots[self.next]
            self.next = (self.next + 1) % len(self.slots)
            if slot[2].query():
                break
        else:
            if len(self.slots) < 4:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))  # creates the CUDA event, so C++ can record it
                slot = [None, 0, ev]
                self.slots.append(slot)
            else:
                slot = self.slots[self.next]
                self.next = (self.next + 1) % len(self.slots)
                slot[2].synchronize()
        if slot[1] < rows or (exact and slot[1] != rows):
            cap = rows if exact else max(rows, 4096, slot[1] * 2)
            slot[0] = torch.empty(cap * row_bytes, dtype=torch.uint8, pin_memory=True)
            slot[1] = cap
        return slot


_pools: dict[Any, _TablePool] = {}


def launch(src: Regions, dst: Regions, region: np.ndarray, src_off: np.ndarray | None, dst_off: np.ndarray | None,
           length: np.ndarray, stream_ptr: int, *, wait_event: int = 0, done_event: int = 0) -> None:
    """The extension path with no checks around it, for transports on their hot path: CUDA regions on the
    current device, the extension loaded. The copy waits on the device for `wait_event` and then records
    `done_event` (raw cudaEvent_t handles, e.g. `torch.cuda.Event().cuda_event`; 0 for none)."""
    ext, t = _ext, TUNING
    knobs = (stream_ptr, int(t["hint"]), int(t["min_chunk"]), int(t["max_chunk"]))
    n = len(length)
    tables = pair_table(src, dst)
    if t["small"] and n <= ext.SMALL_ROWS:
        ext.copy(tables, region, src_off, dst_off, length, 0, 0, 0, 0, *knobs, True, int(t["grid"]),
                 bool(t.get("dry", False)), 0, 0, 1, wait_event, done_event, 0)
        return
    key = (torch.cuda.current_device(), stream_ptr)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = _TablePool(torch.device("cuda", key[0]))
    with pool.lock:
        _launch_locked(ext, pool, stream_ptr, tables, region, src_off, dst_off, length, wait_event, done_event)


def _launch(src: Regions, dst: Regions, region: np.ndarray, src_off: np.ndarray | None, dst_off: np.ndarray | None,
            length: np.ndarray, stream: torch.cuda.Stream | None) -> None:
    dev = src.device if src.on_cuda else dst.device
    if dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return _launch(src, dst, region, src_off, dst_off, length, stream)
    stream = stream or torch.cuda.current_stream(dev)
    launch(src, dst, region, src_off, dst_off, length, stream.cuda_stream)


def pair_table(src: Regions, dst: Regions) -> np.ndarray:
    """The extension's region table for a (source, destination) pair: counts, bases and sizes in one
    array (cached on the source Regions per destination, since transports reuse the same pair)."""
    key = id(dst)
    hit = src._pairs.get(key)
    if hit is not None and hit[0] is dst:
        return hit[1]
    table = np.concatenate([[len(src.ptrs), len(dst.ptrs)], src.ptrs, src.sizes, dst.ptrs, dst.sizes]).astype(np.int64)
    if len(src._pairs) > 64:
        src._pairs.clear()
    src._pairs[key] = (dst, table)
    return table


def _launch_locked(ext: Any, pool: _TablePool, stream_ptr: int, tables: np.ndarray, region: np.ndarray,
                   src_off: np.ndarray | None, dst_off: np.ndarray | None, length: np.ndarray, wait_event: int,
                   done_event: int) -> None:
    args = (tables, region, src_off, dst_off, length)
    t = TUNING
    knobs = (stream_ptr, int(t["hint"]), int(t["min_chunk"]), int(t["max_chunk"]))
    tail = (int(t["grid"]), bool(t.get("dry", False)), int(t["first_piece"]), int(t["max_piece"]), int(t["sides"]))
    n = len(length)
    limit = t.get("table_rows")
    start, run, want = 0, 0, n + 1024
    while start < n:
        slot = pool.acquire(min(want, limit) if limit else want, ext.ROW_BYTES, exact=bool(limit))
        _, nxt, run = ext.copy(*args, start, run, slot[0].data_ptr(), slot[1], *knobs, False, *tail, wait_event,
                               done_event, slot[2].cuda_event)
        wait_event = 0
        if nxt == start:
            limit, want = None, slot[1] * 4
        else:
            want = n - nxt + 1024
        start = nxt


# ----------------------------------------------------------------------------------------- whole blocks

@dataclass
class BlockTable:
    """A device table of region pairs (bases, block strides, the pieces of one block) for
    `launch_blocks`, built once per (source regions, destination regions, geometry); also
    the largest block id each side's registered memory holds, so ids are checked in O(1)."""

    rows: torch.Tensor
    nreg: int
    npieces: int
    max_src: int
    max_dst: int
    item_len: int
    pair_bytes: int

    @cached_property
    def fixed(self) -> tuple:
        """The leading arguments of the extension's copy_blocks, built once."""
        return (self.rows.data_ptr(), self.nreg, self.npieces, self.max_src, self.max_dst, self.item_len,
                self.pair_bytes)

    @classmethod
    def build(cls, src: Regions, dst: Regions, src_stride: Sequence[int], dst_stride: Sequence[int],
              pieces: Sequence[np.ndarray]) -> "BlockTable | None":
        """None when the geometry does not fit the kernel (more pieces per block than it takes):
        the caller then copies segments instead."""
        ext = load()
        nreg = len(pieces)
        if ext is None or nreg == 0 or nreg != len(src.ptrs) or nreg != len(dst.ptrs):
            return None
        npieces = max(len(p) for p in pieces)
        if npieces == 0 or npieces > ext.MAX_PIECES:
            return None
        kp = ext.MAX_PIECES
        words = np.zeros((nreg, ext.BLOCK_REGION_WORDS), dtype=np.int64)
        max_src = max_dst = None
        for r, pc in enumerate(pieces):
            pc = np.asarray(pc, dtype=np.int64).reshape(-1, 3)
            words[r, :4] = (src.ptrs[r], dst.ptrs[r], src_stride[r], dst_stride[r])
            words[r, 4:4 + len(pc)] = pc[:, 0]
            words[r, 4 + kp:4 + kp + len(pc)] = pc[:, 1]
            words[r, 4 + 2 * kp:4 + 2 * kp + len(pc)] = pc[:, 2]
            for side, col, stride, size in ((0, 0, src_stride[r], src.sizes[r]), (1, 1, dst_stride[r], dst.sizes[r])):
                end = int((pc[:, col] + pc[:, 2]).max()) if len(pc) else 0
                if (len(pc) and int(pc[:, col].min()) < 0) or end > size:
                    top = -1
                elif stride > 0:
                    top = min((int(size) - end) // int(stride), 2**31 - 1)
                else:
                    top = 0
                if side == 0:
                    max_src = top if max_src is None else min(max_src, top)
                else:
                    max_dst = top if max_dst is None else min(max_dst, top)
        lens = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1, 3)[:, 2] for p in pieces])
        rows = torch.from_numpy(words.reshape(-1)).to(src.device if src.on_cuda else dst.device)
        return cls(rows, nreg, npieces, int(max_src), int(max_dst), int(lens.max()), int(lens.sum()))


def block_args(table: BlockTable) -> tuple:
    """The leading arguments of the extension's `copy_blocks` for this table and the current knobs
    (a transport may keep them while `TUNING.version` stays the same)."""
    t = TUNING
    return (*table.fixed, int(t["hint"]), int(t["block_min_chunk"]), int(t["block_max_chunk"]), int(t["block_grid"]))


def launch_blocks(table: BlockTable, src_blocks: np.ndarray, dst_blocks: np.ndarray, stream_ptr: int, *,
                  wait_event: int = 0, done_event: int = 0) -> int:
    """Copy whole blocks (`src_blocks[i]` -> `dst_blocks[i]` in every region) in one call: ids
    checked against the registered memory, then one launch per 4000 pairs with the ids in the
    kernel's parameters, on the table's device. Waits on the device for `wait_event`, records
    `done_event`."""
    return _ext.copy_blocks(*block_args(table), src_blocks, dst_blocks, stream_ptr, wait_event, done_event,
                            table.rows.device.index)


def copy_blocks(table: BlockTable, src_blocks: Any, dst_blocks: Any, *, stream: torch.cuda.Stream | None = None) -> int:
    """`launch_blocks` on `stream` (default: the current one) of the table's device."""
    dev = table.rows.device
    with torch.cuda.device(dev):
        stream = stream or torch.cuda.current_stream(dev)
        return launch_blocks(table, _i64(src_blocks), _i64(dst_blocks), stream.cuda_stream)


# ----------------------------------------------------------------------------------------- fallback

def _check(regions: Regions, region: np.ndarray, off: np.ndarray, length: np.ndarray, side: str) -> None:
    if len(length) == 0:
        return
    if length.min() < 0:
        i = int(np.argmax(length < 0))
        raise ValueError(f"segment {i} has a negative length {int(length[i])}")
    n = len(regions.sizes)
    bad = np.flatnonzero((region < 0) | (region >= n))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"segment {i} names {side} region {int(region[i])}, but only {n} are registered")
    end = off + length
    bad = np.flatnonzero((off < 0) | (end > regions.sizes[region]))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"segment {i}: {side} bytes [{int(off[i])}, {int(end[i])}) run past the end of {side} "
                         f"region {int(region[i])} ({int(regions.sizes[region[i]])} bytes)")


def _fallback(src: Regions, dst: Regions, region: np.ndarray, src_off: np.ndarray | None,
              dst_off: np.ndarray | None, length: np.ndarray, stream: torch.cuda.Stream | None) -> None:
    run = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(length) else length
    zeros = np.zeros(len(length), dtype=np.int64)
    so, sr = (src_off, region) if src_off is not None else (run, zeros)
    do, dr = (dst_off, region) if dst_off is not None else (run, zeros)
    _check(src, sr, so, length, "source")
    _check(dst, dr, do, length, "destination")
    s_t, d_t = src.tensors, dst.tensors
    cuda = src.on_cuda or dst.on_cuda
    ctx = torch.cuda.stream(stream) if (cuda and stream is not None) else _nullctx()
    with ctx:
        for a, b, c, d, n in zip(sr.tolist(), so.tolist(), dr.tolist(), do.tolist(), length.tolist()):
            if n:
                d_t[c][d:d + n].copy_(s_t[a][b:b + n], non_blocking=cuda)


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------------------- public API

def _i64(a: Any) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64).reshape(-1)


def _use_ext(*sides: Regions) -> bool:
    if not any(s.on_cuda for s in sides) or load() is None:
        return False
    devs = {s.device for s in sides if s.on_cuda}
    if len(devs) != 1:
        return False
    return all(s.on_cuda or (s._tensors is not None and all(t.is_pinned() for t in s._tensors)) for s in sides)


def copy_segments(src: Sequence[torch.Tensor] | Regions, dst: Sequence[torch.Tensor] | Regions, region: Any,
                  src_off: Any, dst_off: Any, length: Any, *, stream: torch.cuda.Stream | None = None) -> None:
    """Copy `length[i]` bytes from `src[region[i]] + src_off[i]` to `dst[region[i]] + dst_off[i]`
    for every i, in one launch on `stream` (default: the current stream). Asynchronous on CUDA."""
    s, d = Regions.of(src), Regions.of(dst)
    region, length = np.ascontiguousarray(region).reshape(-1), _i64(length)
    if region.dtype not in (np.int32, np.int64):
        region = _i64(region)
    so, do = _i64(src_off), _i64(dst_off)
    if not (len(region) == len(so) == len(do) == len(length)):
        raise ValueError("region, offset and length arrays differ in size")
    if _use_ext(s, d):
        _launch(s, d, region, so, do, length, stream)
    else:
        _fallback(s, d, region, so, do, length, stream)


def gather(regions: Sequence[torch.Tensor] | Regions, region: Any, off: Any, length: Any, out: torch.Tensor | None = None,
           *, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Concatenate the segments' bytes, in order, into one contiguous uint8 buffer (`out`
    may be a pinned host tensor: the kernel then writes through UVA)."""
    s = Regions.of(regions)
    region, off, length = _i64(region), _i64(off), _i64(length)
    total = int(length.sum())
    if out is None:
        out = torch.empty(total, dtype=torch.uint8, device=s.device)
    d = Regions.of([out])
    if total > d.sizes[0]:
        raise ValueError(f"gather output holds {int(d.sizes[0])} bytes, the segments need {total}")
    if _use_ext(s, d):
        _launch(s, d, region, off, None, length, stream)
    else:
        _fallback(s, d, region, off, None, length, stream)
    return out


def scatter(buf: torch.Tensor, regions: Sequence[torch.Tensor] | Regions, region: Any, off: Any, length: Any, *,
            stream: torch.cuda.Stream | None = None) -> None:
    """The reverse of `gather`: consecutive bytes of `buf` into the segments, in order."""
    d = Regions.of(regions)
    s = Regions.of([buf])
    region, off, length = _i64(region), _i64(off), _i64(length)
    if _use_ext(s, d):
        _launch(s, d, region, None, off, length, stream)
    else:
        _fallback(s, d, region, None, off, length, stream)


def _main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m p2pkv.kernels build   (compile the CUDA extension ahead of time)", file=sys.stderr)
        return 2
    ext = load(verbose=True)
    if ext is None:
        print(f"p2pkv CUDA extension not built: {_ext_error}", file=sys.stderr)
        return 1
    print(f"p2pkv CUDA extension ready in {_build_dir()} ({ext.sm_count()} SMs on this device)")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
