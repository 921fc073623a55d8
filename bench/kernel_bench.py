"""In-process microbenchmark of p2pkv's CUDA copy kernels on one GPU (whole blocks from their
ids, and segment rows): random non-contiguous blocks of a Llama-3-8B-shaped paged cache copied
into another cache, against one contiguous device-to-device copy of the same bytes, as GPU time
and as call + synchronize, for each variant (--variants) and kernel knob.

    python bench/kernel_bench.py --tokens 16 512 2048 4096 32768 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from p2pkv import kernels
from p2pkv.layout import block_geometry, make_kv_caches, plan_segments
from p2pkv.transport.base import byte_regions

VARIANTS = {  # name: TUNING overrides; "blocks*" run the whole-block kernel (block ids in its parameters)
    "blocks": {},
    "blocks-c16k": {"block_max_chunk": 16384},
    "blocks-c64k": {"block_max_chunk": 65536, "block_min_chunk": 8192},
    "blocks-g4": {"block_grid": -4},
    "blocks-g16": {"block_grid": -16},
    "blocks-gall": {"block_grid": 1 << 30},
    "blocks-h0": {"hint": 8},
    "blocks-h3": {"hint": 11},
    "blocks-tb": {"hint": 2},
    "blocks-tb-g8": {"hint": 2, "block_grid": -8},
    "blocks-g8": {"block_grid": -8},
    "segments": {},
}
DEFAULTS = dict(kernels.TUNING, dry=False)


def _time(fn, iters: int, stream: torch.cuda.Stream) -> tuple[float, float, float]:
    """Medians in seconds: (GPU time with the host's preparation hidden behind a sleeping
    kernel, host time of the call alone, host time of call + synchronize from an idle GPU)."""
    gpu, prep, e2e = [], [], []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.synchronize()
        torch.cuda._sleep(4_000_000)
        a.record(stream)
        t0 = time.perf_counter()
        fn()
        prep.append(time.perf_counter() - t0)
        b.record(stream)
        b.synchronize()
        gpu.append(a.elapsed_time(b) / 1e3)
        t0 = time.perf_counter()
        fn()
        stream.synchronize()
        e2e.append(time.perf_counter() - t0)
    return statistics.median(gpu), statistics.median(prep), statistics.median(e2e)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 2048, 4096, 32768])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads per rank (1: Llama-3-70B at TP 8)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contiguous", action="store_true", help="consecutive block ids instead of random ones")
    ap.add_argument("--json")
    args = ap.parse_args()
    assert kernels.load() is not None, kernels.unavailable_reason()
    dev = torch.device("cuda")
    nblk_max = max(-(-t // 16) for t in args.tokens)
    nb = max(2 * nblk_max, 256)
    shape = dict(num_layers=args.layers, num_blocks=nb, block_size=16, num_kv_heads=args.kv_heads, head_size=128, dtype="bf16", device=dev)
    src_t, sspec = make_kv_caches("vllm", fill="random", **shape)
    dst_t, dspec = make_kv_caches("vllm", fill="empty", **shape)
    src_b, dst_b = byte_regions(src_t, sspec), byte_regions(dst_t, dspec)
    src, dst = kernels.Regions.of(src_b), kernels.Regions.of(dst_b)
    table = kernels.BlockTable.build(src, dst, *block_geometry(sspec, dspec))
    stream = torch.cuda.current_stream()
    rng = np.random.default_rng(0)
    rows = []
    for tokens in args.tokens:
        nblk = -(-tokens // 16)
        def ids() -> np.ndarray:
            if args.contiguous:
                start = int(rng.integers(0, nb - nblk + 1))
                return np.arange(start, start + nblk)
            return rng.choice(nb, nblk, replace=False)
        plans = [plan_segments(sspec, dspec, ids(), ids()) for _ in range(4)]
        nbytes = plans[0].nbytes
        a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        a.random_(0, 256)
        for _ in range(3):
            b.copy_(a)
        base_ev, _, base_host = _time(lambda: b.copy_(a), args.iters, stream)
        row = {"tokens": tokens, "bytes": nbytes, "segments": len(plans[0]), "memcpy_gbps": nbytes / base_ev / 1e9,
               "memcpy_host_us": base_host * 1e6}
        for name in args.variants:
            kernels.TUNING.clear()
            kernels.TUNING.update(DEFAULTS, **VARIANTS[name])
            k = [0]

            def run() -> None:
                p = plans[k[0] % len(plans)]
                k[0] += 1
                kernels.copy_segments(src, dst, p.region, p.src, p.dst, p.length, stream=stream)

            def run_blocks() -> None:
                p = plans[k[0] % len(plans)]
                k[0] += 1
                kernels.launch_blocks(table, p.plan.src_blocks, p.plan.dst_blocks, stream.cuda_stream)
            fn = run_blocks if name.startswith("blocks") else run
            for _ in range(3):
                fn()
            ev, prep, host = _time(fn, args.iters, stream)
            row[f"{name}_gbps"] = nbytes / ev / 1e9
            row[f"{name}_ratio"] = base_ev / ev
            row[f"{name}_host_us"] = host * 1e6
            row[f"{name}_host_ratio"] = base_host / host
            row[f"{name}_prep_us"] = prep * 1e6
        p = plans[0]
        kernels.TUNING.clear()
        kernels.TUNING.update(DEFAULTS)
        ref = [torch.full_like(r, 0xA5) for r in dst_b]
        kernels._fallback(src, kernels.Regions.of(ref), p.region.astype(np.int64), p.src, p.dst, p.length, None)
        row["verified"] = True
        for how in ("segments", "blocks"):
            for r in dst_b:
                r.fill_(0xA5)
            if how == "blocks":
                kernels.copy_blocks(table, p.plan.src_blocks, p.plan.dst_blocks)
            else:
                kernels.copy_segments(src, dst, p.region, p.src, p.dst, p.length)
            torch.cuda.synchronize()
            row["verified"] = row["verified"] and all(torch.equal(x, y) for x, y in zip(dst_b, ref))
        del ref, a, b
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print("per variant: GPU-time ratio to memcpy / end-to-end host ratio / host prep us")
    print(f"{'tokens':>6} {'segs':>6} {'MiB':>7} {'memcpy GB/s':>11} {'memcpy us':>9} " + " ".join(f"{v:>22}" for v in args.variants))
    for r in rows:
        print(f"{r['tokens']:>6} {r['segments']:>6} {r['bytes'] / 2**20:>7.1f} {r['memcpy_gbps']:>11.1f} {r['memcpy_host_us']:>9.1f} "
              + " ".join(f"{r[v + '_ratio']:>8.3f}/{r[v + '_host_ratio']:.3f}/{r[v + '_prep_us']:>5.0f}" for v in args.variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
