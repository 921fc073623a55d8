"""What a bench run prints and writes: the result table with a legend of its columns, the --busy table, the
--json file and the --plot PNG."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from p2pkv.bench.busy import BUSY_SLICE_S

__all__ = ["COLUMNS", "BUSY_COLUMNS", "LEGEND", "BUSY_LEGEND", "format_table", "format_busy_table", "write_json",
           "plot"]

COLUMNS = [("backend", "backend", "{}"), ("device", "dev", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"),
           ("tokens", "tokens", "{}"), ("segments", "segs", "{}"), ("bytes", "MiB/req", None), ("gbps", "GB/s", "{:.2f}"),
           ("baseline_gbps", "base GB/s", "{:.2f}"), ("ratio", "ratio", "{:.3f}"), ("p50_ms", "p50 ms", "{:.3f}"),
           ("p99_ms", "p99 ms", "{:.3f}"), ("verified", "verified", "{}")]

LEGEND = """\
segs       byte segments one request moves (contiguous block runs merged, per region and span)
MiB/req    payload of one request (its blocks in every layer)
GB/s       payload / p50 request time, p2pkv's transfer of the scattered blocks
base GB/s  the same bytes as one contiguous buffer over the raw link, measured in the same run
ratio      GB/s / base GB/s: what p2pkv costs against the raw link (1.0 = no cost)
p50/p99 ms latency of one request from posting to completion
verified   every byte of every destination block matched P's and no other block of D changed"""

BUSY_COLUMNS = [("backend", "backend", "{}"), ("device", "dev", "{}"), ("tokens", "tokens", "{}"),
                ("idle_p50_ms", "idle ms", "{:.3f}"), ("p_busy_thread_p50_ms", "P thread ms", "{:.3f}"),
                ("p_busy_proc_p50_ms", "P proc ms", "{:.3f}"), ("p_busy_ratio", "P ratio", "{:.2f}"),
                ("d_engine_p50_ms", "D loop ms", "{:.3f}"), ("d_engine_ratio", "D ratio", "{:.2f}"),
                ("busy_slice_ms", "slice ms", "{:.3f}"), ("d_engine_target_ms", "D target ms", "{:.3f}"),
                ("verified", "verified", "{}")]

BUSY_LEGEND = f"""\
idle ms      p50 per request with nothing else running (the p50 above)
P thread ms  p50 with a pure-Python thread spinning inside P's process (it holds P's GIL)
P proc ms    p50 with the same spin in a separate process (the same CPU load, no GIL contention)
P ratio      P thread / P proc: what a busy engine thread in P costs D's reads (target <= 1.1)
D loop ms    p50 with D's posting thread as an engine's: {BUSY_SLICE_S * 1e3:g} ms of pure Python, then one done()
             poll, repeated; a request's time is the first poll that sees it done
D ratio      D loop / idle
slice ms     the median length of D's work slices in that loop, as measured
D target ms  1.1 x idle + one {BUSY_SLICE_S * 1e3:g} ms slice (its median length as measured): D loop should be at most this
verified     D's whole cache checked after each case (idle and the three busy ones), and reset between them"""


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str | None]] = COLUMNS) -> str:
    """A text table of result rows, one line each, in `columns` (key, heading, format)."""
    head = [c[1] for c in columns]
    body = [[f"{r['bytes'] / 2**20:.1f}" if key == "bytes" else fmt.format(r.get(key, "")) for key, _, fmt in columns]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def format_busy_table(rows: list[dict[str, Any]]) -> str:
    """The --busy figures of each row against its idle run, followed by a legend of the columns."""
    return format_table(rows, BUSY_COLUMNS) + "\n\n" + BUSY_LEGEND


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]], path: str) -> None:
    """The --json contract: every flag under "config", one row per (backend, device, tokens) under "results"."""
    config = {k: v for k, v in vars(args).items() if k not in ("role", "connect")}
    with open(path, "w") as f:
        json.dump({"config": config, "results": rows}, f, indent=2)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """A PNG of payload GB/s against tokens per request, p2pkv and its raw baseline per backend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in rows}):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in rs], [r["gbps"] for r in rs], "o-", label=f"p2pkv {backend}")
        ax.plot([r["tokens"] for r in rs], [r["baseline_gbps"] for r in rs], "x--", label=f"raw baseline {backend}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per request")
    ax.set_ylabel("GB/s (payload)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
