"""Plot GB/s against tokens per request for every GPU backend and its same-run
baseline, from the JSON files bench/gpu_pair_bench.py and bench/kernel_bench.py wrote.

    python bench/plot.py docs/data/cuda_ipc_h100_pair_sweep.json docs/data/tcp_cuda_h100_pair_sweep.json \
        --kernel docs/data/kernel_h100.json --out docs/gbps_vs_tokens.png
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="+", help="JSON of bench/gpu_pair_bench.py (or p2pkv bench --json)")
    ap.add_argument("--kernel", help="JSON of bench/kernel_bench.py (one process, no transport)")
    ap.add_argument("--out", default="docs/gbps_vs_tokens.png")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for path in args.pairs:
        rows = json.load(open(path))["results"]
        b = rows[0]["backend"]
        t = [r["tokens"] for r in rows]
        line, = ax.plot(t, [r["gbps"] for r in rows], "o-", label=f"{b} (two processes)")
        ax.plot(t, [r["baseline_gbps"] for r in rows], "x--", color=line.get_color(), label=f"{b} raw baseline")
    if args.kernel:
        rows = json.load(open(args.kernel))["rows"]
        t = [r["tokens"] for r in rows]
        key = next(k for k in rows[0] if k.endswith("_host_ratio"))
        ax.plot(t, [r["memcpy_gbps"] * r[key] for r in rows], "s-", label="copy kernel, one process, call+sync")
        ax.plot(t, [r["memcpy_gbps"] for r in rows], "k:", label="contiguous cudaMemcpy D2D (GPU time)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per request (Llama-3-8B shape, bf16, 32 layers)")
    ax.set_ylabel("payload GB/s (p50)")
    ax.set_title("p2pkv on one H100: GB/s against tokens per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
