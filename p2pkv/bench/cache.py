"""The bench's KV caches: their size (checked against free memory before anything is allocated), deterministic
random contents, and the byte-for-byte check of D's cache after the reads."""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

from p2pkv.bench.errors import BenchError
from p2pkv.bench.progress import progress
from p2pkv.layout import KVCacheSpec, dtype_from_name, make_kv_caches

__all__ = ["P_SEED", "D_SEED", "num_blocks", "cache_bytes", "fill", "build", "block_dim", "verify", "check_memory",
           "device_of"]

P_SEED, D_SEED = 1234, 98765
FILL_CHUNK = 4 << 20
PROGRESS_EVERY_S = 2.0


def num_blocks(args: argparse.Namespace) -> tuple[int, int]:
    """Blocks per request (the largest --tokens) and blocks per cache (all requests, plus spare blocks)."""
    per_req = max(-(-t // args.block_size) for t in args.tokens)
    return per_req, per_req * args.requests + max(8, per_req * args.requests // 8)


def cache_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """Bytes of one rank's KV cache and of its largest tensor (D's verification holds two more of those)."""
    _, nb = num_blocks(args)
    block, heads, head = args.block_size, args.kv_heads, args.head_size
    per_block = block * head if args.layout == "mla" else 2 * block * heads * head
    per_layer = nb * per_block * dtype_from_name(args.dtype).itemsize
    total = per_layer * args.layers
    return total, total if args.layout == "cross_layer" else per_layer


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def fill(region: torch.Tensor, seed: int, done: Callable[[int], None] | None = None) -> None:
    """Deterministic random bytes, made 4 MiB at a time so that filling (and re-making
    the expected bytes when verifying) never holds a second copy of a region; `done(n)` after each piece."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, region.numel(), FILL_CHUNK):
        part = region[start:start + FILL_CHUNK]
        part.copy_(torch.randint(0, 256, (part.numel(),), dtype=torch.uint8, generator=g).to(region.device))
        if done is not None:
            done(part.numel())


class _FillProgress:
    """Says on stderr how far filling a cache got, every PROGRESS_EVERY_S seconds."""

    def __init__(self, side: str, total: int):
        self.side, self.total, self.done, self.shown = side, total, 0, time.monotonic()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if time.monotonic() - self.shown > PROGRESS_EVERY_S and self.done < self.total:
            progress(f"{self.side}: filled {_size(self.done)} of {_size(self.total)}")
            self.shown = time.monotonic()


def build(args: argparse.Namespace, device: str, seed: int, side: str = "") -> tuple[list[torch.Tensor], KVCacheSpec]:
    """One rank's cache, filled from `seed`; with `side` (P or D) it says so on stderr, and how far filling got
    every couple of seconds (a cache of many GiB takes minutes to fill)."""
    _, nb = num_blocks(args)
    if side:
        progress(f"{side}: allocating and filling {_size(cache_bytes(args)[0])} of KV cache on {device}")
    tensors, spec = make_kv_caches(args.layout, num_layers=args.layers, num_blocks=nb, block_size=args.block_size,
                                   num_kv_heads=args.kv_heads, head_size=args.head_size, dtype=args.dtype, device=device)
    done = _FillProgress(side, sum(t.nbytes for t in tensors)) if side else None
    for i, t in enumerate(tensors):
        fill(t.view(torch.uint8).view(-1), seed + i, done)
    return tensors, spec


def block_dim(layout: str) -> int:
    """The dim that indexes blocks in the preset's tensors."""
    return 1 if layout == "vllm" else 0


def verify(args: argparse.Namespace, tensors: list[torch.Tensor], last_src: dict[int, int]) -> bool:
    """D's cache equals P's on every written block (last writer wins) and its own initial bytes elsewhere,
    checked with plain tensor indexing, independent of the segment planner."""
    bdim = block_dim(args.layout)
    order = sorted(last_src)
    dst = torch.tensor(order, dtype=torch.long, device=tensors[0].device)
    src = torch.tensor([last_src[d] for d in order], dtype=torch.long, device=tensors[0].device)
    ok = True
    for i, t in enumerate(tensors):
        got = t.view(torch.uint8)
        expect, p_bytes = torch.empty_like(got), torch.empty_like(got)
        fill(expect.view(-1), D_SEED + args.seed + i)
        fill(p_bytes.view(-1), P_SEED + args.seed + i)
        expect.index_copy_(bdim, dst, p_bytes.index_select(bdim, src))
        ok = ok and torch.equal(expect, got)
        del expect, p_bytes
    return bool(ok)


def _available_memory(device: str) -> int | None:
    """Bytes free now for the cache: host MemAvailable, or the free memory of this rank's GPU; None if unknown."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(args: argparse.Namespace, local_pair: bool) -> None:
    """Refuse a shape whose caches cannot fit, before allocating: P's and D's caches (both here without
    torchrun, on one host or GPU) plus D's two verification copies of its largest tensor."""
    cache, largest = cache_bytes(args)
    is_d = local_pair or int(os.environ.get("RANK", "0")) == 1
    need = cache * (2 if local_pair and args.device == "cpu" else 1) + (2 * largest if is_d else 0)
    free = _available_memory(args.device)
    if free is not None and need > free:
        raise BenchError(f"this run needs {need / 2**30:.1f} GiB of {args.device} memory ({cache / 2**30:.1f} GiB "
                         f"of KV cache per rank) but {free / 2**30:.1f} GiB is available; "
                         "lower --tokens, --requests or --layers")


def device_of(args: argparse.Namespace) -> str:
    """This rank's torch device: cpu, or the GPU of its LOCAL_RANK."""
    if args.device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
