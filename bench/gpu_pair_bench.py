"""Two-process GPU benchmark (P in a child process, D here) for cuda_ipc and tcp on
CUDA tensors, measured as `p2pkv bench` measures: random non-contiguous P blocks
read into random D blocks, every request verified, p50/p99 latency per request, and
the transport's same-run raw baseline of the same bytes. Both processes leave with
os._exit once their results are out, so nothing at interpreter exit can discard them.

    python bench/gpu_pair_bench.py --backend cuda_ipc --tokens 16 512 2048 4096 --json out.json
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

from p2pkv import kernels
from p2pkv.layout import make_kv_caches, plan_segments
from p2pkv.transport import get_transport


def build(args: argparse.Namespace, blocks: int, seed: int):
    tensors, spec = make_kv_caches(args.layout, num_layers=args.layers, num_blocks=blocks, block_size=16,
                                   num_kv_heads=8, head_size=128, dtype="bf16", device="cuda", fill="empty")
    g = torch.Generator(device="cuda").manual_seed(seed)
    for t in tensors:
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, device="cuda", generator=g))
    torch.cuda.synchronize()
    return tensors, spec


def serve(args: argparse.Namespace) -> None:
    tensors, spec = build(args, args.blocks, 1234)
    tr = get_transport(args.backend, timeout=120)
    tr.register(tensors, spec)
    print(f"ADDR {tr.address}", flush=True)
    sys.stdin.readline()
    tr.close()
    sys.stdout.flush()
    os._exit(0)


def _instrument(tr) -> dict:
    """Wrap the steps of a read with timers (for --breakdown)."""
    from collections import defaultdict
    steps: dict = defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                steps[name].append(time.perf_counter() - t0)
        return wrapper

    class ExtProxy:
        def __init__(self, ext):
            self._e = ext
            self.copy = timed("ext.copy", ext.copy)

        def __getattr__(self, name):
            return getattr(self._e, name)

    tr._live = timed("live", tr._live)
    tr._launch = timed("transport._launch", tr._launch)
    kernels.launch = timed("kernels.launch", kernels.launch)
    ext = tr._ext

    class TransportExt:  # times the transport's one extension call and its steps inside
        def __getattr__(self, name):
            return getattr(ext, name)

        def copy_blocks(self, *a):
            return self._timed(ext.copy_blocks, a)

        def BlockCopier(self, *bound):  # noqa: N802 - stands in for the extension's class
            copier = ext.BlockCopier(*bound)
            return lambda *a: self._timed(copier, a)

        def _timed(self, fn, a):
            t0 = time.perf_counter()
            out = fn(*a)
            t1 = time.perf_counter()
            steps["ext.copy_blocks"].append(t1 - t0)
            steps["_launched_at"].append(t1)
            for name, ns in zip(("ids checked", "ready event handled", "launched", "done recorded"), ext.last_steps()):
                steps[f"  copy_blocks: {name} at"].append(ns * 1e-9)
            return out
    tr._ext = TransportExt()
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cuda_ipc")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 2048, 4096])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--layout", default="vllm")
    ap.add_argument("--requests", type=int, default=40, help="timed requests per row (each its own random blocks)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--blocks", type=int, default=0)
    ap.add_argument("--verify-every", type=int, default=1, help="check every N-th request (the last one always)")
    ap.add_argument("--breakdown", action="store_true", help="time the steps inside read() (adds some overhead)")
    ap.add_argument("--tuning", default="{}", help="JSON of p2pkv.kernels.TUNING overrides")
    args = ap.parse_args()
    nblk_max = max(-(-t // 16) for t in args.tokens)
    args.blocks = args.blocks or 2 * nblk_max + 64
    kernels.TUNING.update(json.loads(args.tuning))
    if args.serve:
        serve(args)
        return
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--backend", args.backend, "--layers", str(args.layers),
                              "--layout", args.layout, "--blocks", str(args.blocks), "--tokens", *map(str, args.tokens)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        line = child.stdout.readline().strip()
        assert line.startswith("ADDR "), f"P failed to start: {line!r}"
        p_expect, _ = build(args, args.blocks, 1234)  # P's bytes, regenerated here to verify against
        d_t, d_spec = build(args, args.blocks, 99)
        tr = get_transport(args.backend, timeout=120)
        tr.register(d_t, d_spec)
        peer = tr.connect(line[5:])
        steps = _instrument(tr) if args.breakdown else None
        bdim = 1 if args.layout == "vllm" else 0
        rng = np.random.default_rng(0)
        for tokens in args.tokens:
            nblk = -(-tokens // 16)
            lat, base, calls, ok, nbytes, nseg = [], [], [], True, 0, 0
            for i in range(args.warmup + args.requests):
                sb, db = rng.choice(args.blocks, nblk, replace=False), rng.choice(args.blocks, nblk, replace=False)
                segs = plan_segments(peer.spec, d_spec, sb, db)
                nbytes, nseg = segs.nbytes, len(segs)
                torch.cuda.synchronize()
                # the raw copy and the transfer take turns going first, so neither always finds a warm GPU
                if i % 2:
                    b = tr.baseline(peer, nbytes, 1)
                t0 = time.perf_counter()
                h = tr.read(peer, segs, request_id=f"{tokens}-{i}")
                t1 = time.perf_counter()
                h.wait(120)
                dt = time.perf_counter() - t0
                if steps is not None and steps.get("_launched_at"):
                    steps["launch returned after read() began"].append(steps.pop("_launched_at")[-1] - t0)
                    steps["wait() returned after read() returned"].append(time.perf_counter() - t1)
                calls.append(t1 - t0)
                if not i % 2:
                    b = tr.baseline(peer, nbytes, 1)
                if i >= args.warmup:
                    lat.append(dt)
                    base.append(b)
                if i % args.verify_every and i != args.warmup + args.requests - 1:
                    continue
                si, di = torch.as_tensor(sb, device="cuda"), torch.as_tensor(db, device="cuda")
                ok = ok and all(torch.equal(d.view(torch.uint8).index_select(bdim, di),
                                            p.view(torch.uint8).index_select(bdim, si)) for d, p in zip(d_t, p_expect))
            p50 = float(np.percentile(lat, 50))
            b50 = statistics.median(base)
            row = {"backend": args.backend, "device": "cuda", "gpu": torch.cuda.get_device_name(), "layout": args.layout,
                   "dtype": "bf16", "tokens": tokens, "requests": args.requests, "bytes": nbytes, "segments": nseg,
                   "gbps": round(nbytes / p50 / 1e9, 3), "baseline_gbps": round(nbytes / b50 / 1e9, 3),
                   "ratio": round(b50 / p50, 4), "p50_ms": round(p50 * 1e3, 4),
                   "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 4),
                   "baseline_p50_ms": round(b50 * 1e3, 4), "baseline_p99_ms": round(float(np.percentile(base, 99)) * 1e3, 4),
                   "read_call_p50_ms": round(statistics.median(calls[args.warmup:]) * 1e3, 4),
                   "verified": bool(ok), "tuning": dict(kernels.TUNING)}
            if steps is not None:
                row["steps_p50_us"] = {k: round(statistics.median(v) * 1e6, 1) for k, v in steps.items()}
                steps.clear()
            rows.append(row)
            print(json.dumps(row), flush=True)
        tr.close()
        print(f"{'backend':>8} {'tokens':>6} {'MiB':>7} {'segs':>6} {'GB/s':>8} {'base GB/s':>9} {'ratio':>6} "
              f"{'p50 ms':>8} {'p99 ms':>8} verified")
        for r in rows:
            print(f"{r['backend']:>8} {r['tokens']:>6} {r['bytes'] / 2**20:>7.1f} {r['segments']:>6} {r['gbps']:>8.1f} "
                  f"{r['baseline_gbps']:>9.1f} {r['ratio']:>6.3f} {r['p50_ms']:>8.4f} {r['p99_ms']:>8.4f} {r['verified']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "results": rows}, f, indent=1)
    finally:
        if child.poll() is None:
            try:
                child.stdin.write("quit\n")
                child.stdin.flush()
                child.wait(timeout=20)
            except Exception:  # noqa: BLE001
                child.kill()
    sys.stdout.flush()
    os._exit(0 if rows and all(r["verified"] for r in rows) else 1)


if __name__ == "__main__":
    main()
