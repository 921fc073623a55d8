"""Where packing beats sending views: the `nccl` backend (gloo on CPU here) moves the
same bytes as N random segments of one size, once as N views of the registered
memory and once packed into pipelined chunks, next to one contiguous send of the
same bytes, interleaved so each ratio compares runs made seconds apart.

    python bench/nccl_threshold.py [--total-mib 64] [--sizes 4K,16K,64K,256K,1M,4M] [--iters 7]
        [--variants direct,pack] [--chunk-bytes 2M] [--depth 2] [--json PATH]

Prints, per segment size, the median of (contiguous time / transfer time) for each
variant; `pack_threshold` belongs where `pack` stops winning. Extra variants
`pack:CHUNK:DEPTH[:WINDOW]` (e.g. `pack:512K:8:16M`) sweep the chunking and the
receive window.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from p2pkv.layout import KVCacheSpec
from p2pkv.segments import Segments
from p2pkv.transport import get_transport

UNIT = 4096


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def variant_options(v: str, chunk_bytes: int, depth: int) -> dict:
    """'direct' → every segment a view; 'pack' or 'pack:CHUNK:DEPTH[:WINDOW]' → everything packed."""
    if v == "direct":
        return {"pack_threshold": 0}
    parts = v.split(":")
    if parts[0] != "pack":
        raise SystemExit(f"unknown variant {v!r}: use direct, pack or pack:CHUNK:DEPTH")
    cb = parse_size(parts[1]) if len(parts) > 1 else chunk_bytes
    dp = int(parts[2]) if len(parts) > 2 else depth
    out = {"pack_threshold": 1 << 62, "chunk_bytes": cb, "depth": dp}
    if len(parts) > 3:
        out["recv_window_bytes"] = parse_size(parts[3])
    return out


def region(nbytes: int, seed: int) -> tuple[torch.Tensor, KVCacheSpec]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (nbytes // UNIT, UNIT), dtype=torch.uint8, generator=g)
    return t, KVCacheSpec.from_tensors([t], block_dim=0, layout="threshold-bench")


def serve(args: argparse.Namespace) -> None:
    """P: one transport per variant over the same memory; prints their addresses, serves until stdin closes."""
    t, spec = region(args.region_bytes, 1)
    trs = []
    for opts in json.loads(args.serve):
        tr = get_transport("nccl", timeout=args.timeout, **opts)
        tr.register([t], spec)
        trs.append(tr)
        print(tr.address, flush=True)
    sys.stdin.read()
    for tr in trs:
        tr.close()


def measure(args: argparse.Namespace) -> list[dict]:
    variants = args.variants.split(",")
    opts = [variant_options(v, args.chunk_bytes, args.depth) for v in variants]
    total = args.total_mib << 20
    args.region_bytes = 4 * total
    child = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(opts), "--total-mib", str(args.total_mib),
                              "--timeout", str(args.timeout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        addrs = [child.stdout.readline().strip() for _ in opts]  # type: ignore[union-attr]
        t, spec = region(args.region_bytes, 2)
        trs, peers = [], []
        for o, a in zip(opts, addrs):
            tr = get_transport("nccl", timeout=args.timeout, **o)
            tr.register([t], spec)
            trs.append(tr)
            peers.append(tr.connect(a))
        rng = np.random.default_rng(0)
        for size in args.sizes:
            n = total // size
            slots = args.region_bytes // size
            times: dict[str, list[float]] = {v: [] for v in variants}
            base: list[float] = []
            for it in range(args.warmup + args.iters):
                src = rng.permutation(slots)[:n] * size
                dst = rng.permutation(slots)[:n] * size
                segs = Segments(np.zeros(n, dtype=np.int32), src.astype(np.int64), dst.astype(np.int64),
                                np.full(n, size, dtype=np.int64))
                b0 = trs[0].baseline(peers[0], total, 1)
                row_t = {}
                for v, tr, peer in zip(variants, trs, peers):
                    t0 = time.perf_counter()
                    tr.read(peer, segs, request_id=f"{v}-{size}-{it}").wait(args.timeout)
                    row_t[v] = time.perf_counter() - t0
                b1 = trs[0].baseline(peers[0], total, 1)
                if it >= args.warmup:
                    base.append((b0 + b1) / 2)
                    for v in variants:
                        times[v].append(row_t[v])
            row = {"segment_bytes": size, "segments": n, "total_bytes": n * size,
                   "baseline_gbps": round(n * size / statistics.median(base) / 1e9, 3)}
            for v in variants:
                ratios = [b / x for b, x in zip(base, times[v])]
                row[f"{v}_ratio"] = round(statistics.median(ratios), 3)
                row[f"{v}_gbps"] = round(n * size / statistics.median(times[v]) / 1e9, 3)
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        for tr in trs:
            tr.close()
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total-mib", type=int, default=64, help="bytes per transfer (MiB)")
    p.add_argument("--sizes", default="4K,16K,32K,64K,256K,1M,4M", help="segment sizes, comma separated")
    p.add_argument("--variants", default="direct,pack")
    p.add_argument("--chunk-bytes", default="2M")
    p.add_argument("--depth", type=int, default=2, help="chunks in flight (gloo: sender threads; the backend default)")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.chunk_bytes = parse_size(args.chunk_bytes)
    if args.serve:
        args.region_bytes = 4 * (args.total_mib << 20)
        serve(args)
        return
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    if any(s % UNIT or s <= 0 for s in args.sizes):
        raise SystemExit(f"segment sizes must be positive multiples of {UNIT}")
    print(f"nccl threshold sweep: gloo, {args.total_mib} MiB per transfer, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {torch.get_num_threads()}", flush=True)
    rows = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "serve"}, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
