"""Soak: one P, several D processes, thousands of transfers of random sizes and
layouts over one backend; every transfer is verified byte for byte (destination
blocks and every other block), and P's and D's resident memory and open file
descriptors are measured after warm-up and at the end.

    python bench/soak.py --transfers 10000 --ds 3 --json soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from p2pkv.layout import PRESETS, make_kv_caches, plan_segments
from p2pkv.transport import get_transport

BLOCK_DIM = {"vllm": 1, "vllm_cpu": 0, "block_first": 0, "mla": 0, "cross_layer": 0}
SHAPE = dict(num_layers=3, num_blocks=64, block_size=16, num_kv_heads=2, head_size=64)
DTYPES = ["bf16", "fp16", "fp32"]


def cache(layout: str, dtype: str, seed: int | None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return make_kv_caches(layout, dtype=dtype, fill="random" if g else "zeros", generator=g, **SHAPE)


def configs() -> list[tuple[str, str]]:
    return [(lay, dt) for lay in PRESETS for dt in DTYPES]


def usage() -> dict[str, float]:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"rss_mib": round(rss, 2), "fds": len(os.listdir("/proc/self/fd"))}


def run_p(args: argparse.Namespace) -> None:
    trs = []
    for i, (lay, dt) in enumerate(configs()):
        tensors, spec = cache(lay, dt, seed=i)
        tr = get_transport(args.backend, timeout=args.timeout)
        tr.register(tensors, spec)
        trs.append((tr, tensors))
        print("ADDR", tr.address, flush=True)
    marks = []
    for line in sys.stdin:
        if line.strip() == "mark":
            marks.append(usage())
            print("MARK", json.dumps(marks[-1]), flush=True)
        elif line.strip() == "quit":
            break
    for tr, _ in trs:
        tr.close()


def run_d(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # tiny tensors: OpenMP workers would only spin against each other
    rng = np.random.default_rng(args.seed)
    addrs = args.addresses.split(",")
    cfgs = configs()
    sides = []
    for i, ((lay, dt), addr) in enumerate(zip(cfgs, addrs)):
        d_tensors, d_spec = cache(lay, dt, seed=1000 + i)
        p_tensors, _ = cache(lay, dt, seed=i)
        shadow = [t.view(torch.uint8).clone() for t in d_tensors]
        tr = get_transport(args.backend, timeout=args.timeout)
        tr.register(d_tensors, d_spec)
        peer = tr.connect(addr)
        sides.append((lay, tr, peer, d_tensors, d_spec, p_tensors, shadow))
    start, failures, nbytes = None, [], 0
    t0 = time.perf_counter()
    for k in range(args.transfers):
        if k == args.warmup:
            start = usage()
            print("WARM", flush=True)
            sys.stdin.readline()
        lay, tr, peer, d_tensors, d_spec, p_tensors, shadow = sides[int(rng.integers(len(sides)))]
        n = int(rng.integers(1, 33))
        src = rng.choice(SHAPE["num_blocks"], n, replace=False)
        dst = rng.choice(SHAPE["num_blocks"], n, replace=False)
        segs = plan_segments(peer.spec, d_spec, src, dst)
        tr.read(peer, segs, request_id=f"soak-{args.seed}-{k}").wait(args.timeout)
        nbytes += segs.nbytes
        bd = BLOCK_DIM[lay]
        ok = True
        for sh, p, d in zip(shadow, p_tensors, d_tensors):
            sh.index_copy_(bd, torch.as_tensor(dst), p.view(torch.uint8).index_select(bd, torch.as_tensor(src)))
            ok = ok and torch.equal(sh, d.view(torch.uint8))
        if not ok:
            failures.append(k)
    elapsed = time.perf_counter() - t0
    end = usage()
    print("RESULT", json.dumps({"transfers": args.transfers, "failures": failures, "bytes": nbytes,
                                "seconds": round(elapsed, 3), "start": start, "end": end}), flush=True)
    sys.stdin.readline()
    for s in sides:
        s[1].close()


def orchestrate(args: argparse.Namespace) -> int:
    me = os.path.abspath(__file__)
    common = ["--backend", args.backend, "--timeout", str(args.timeout)]
    p = subprocess.Popen([sys.executable, me, "p", *common], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ds: list[subprocess.Popen] = []
    try:
        addrs = [p.stdout.readline().split()[1] for _ in configs()]  # type: ignore[union-attr]
        per = -(-args.transfers // args.ds)
        for i in range(args.ds):
            ds.append(subprocess.Popen([sys.executable, me, "d", *common, "--addresses", ",".join(addrs),
                                        "--transfers", str(per), "--warmup", str(min(args.warmup, per - 1)),
                                        "--seed", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for d in ds:
            assert d.stdout.readline().strip() == "WARM"  # type: ignore[union-attr]
        p.stdin.write("mark\n"); p.stdin.flush()  # type: ignore[union-attr]
        p_start = json.loads(p.stdout.readline().split(" ", 1)[1])  # type: ignore[union-attr]
        for d in ds:
            d.stdin.write("go\n"); d.stdin.flush()  # type: ignore[union-attr]
        results = []
        for d in ds:
            line = d.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("RESULT "):
                raise SystemExit(f"a D process failed (exit {d.wait()})")
            results.append(json.loads(line[7:]))
        p.stdin.write("mark\n"); p.stdin.flush()  # type: ignore[union-attr]
        p_end = json.loads(p.stdout.readline().split(" ", 1)[1])  # type: ignore[union-attr]
        for d in ds:
            d.communicate("bye\n", timeout=args.timeout)
        p.stdin.write("quit\n"); p.stdin.flush()  # type: ignore[union-attr]
        p.wait(30)
    finally:
        for proc in [p, *ds]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    total = sum(r["transfers"] for r in results)
    summary = {"backend": args.backend, "d_processes": args.ds, "transfers": total,
               "failures": sum(len(r["failures"]) for r in results), "bytes": sum(r["bytes"] for r in results),
               "p": {"start": p_start, "end": p_end}, "d": [{"start": r["start"], "end": r["end"]} for r in results],
               "max_seconds": max(r["seconds"] for r in results)}
    rss = [(summary["p"]["start"]["rss_mib"], summary["p"]["end"]["rss_mib"])] + \
          [(r["start"]["rss_mib"], r["end"]["rss_mib"]) for r in results]
    fds = [(summary["p"]["start"]["fds"], summary["p"]["end"]["fds"])] + [(r["start"]["fds"], r["end"]["fds"]) for r in results]
    summary["max_rss_growth"] = round(max(e / s - 1 for s, e in rss), 4)
    summary["fds_flat"] = all(s == e for s, e in fds)
    print(f"soak: {total} transfers ({summary['bytes'] / 2**30:.2f} GiB) over {args.backend}, "
          f"{summary['failures']} failed verification; RSS growth max {summary['max_rss_growth']:+.2%} "
          f"(P {p_start['rss_mib']:.0f}→{p_end['rss_mib']:.0f} MiB); open fds "
          f"{'flat' if summary['fds_flat'] else 'CHANGED: ' + str(fds)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failures"] == 0 and summary["fds_flat"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", nargs="?", choices=["p", "d"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--transfers", type=int, default=10000)
    ap.add_argument("--ds", type=int, default=3, help="number of D processes")
    ap.add_argument("--warmup", type=int, default=200, help="transfers per D before the start measurement")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--json")
    ap.add_argument("--addresses", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "p":
        run_p(args)
        return 0
    if args.role == "d":
        run_d(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
