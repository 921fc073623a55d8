"""Where a cuda_ipc read spends its time: each step of `read().wait()` timed alone
(median microseconds) against a P process, plus the GPU time of the copy kernel on
IPC-mapped versus local source memory.

    python bench/ipc_profile.py --tokens 16 4096
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_pair_bench import build  # noqa: E402

from p2pkv import kernels  # noqa: E402
from p2pkv.layout import plan_segments  # noqa: E402
from p2pkv.transport import get_transport  # noqa: E402
from p2pkv.transport.cuda_ipc import _CudaHandle  # noqa: E402


def med(fn, n: int = 200) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def med_idle(fn, n: int = 100) -> float:
    """Median host time of `fn` called on an idle GPU (synchronized before each call, untimed)."""
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def gpu_us(fn, n: int = 30) -> float:
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(3_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 4096])
    args = ap.parse_args()
    blocks = 2 * max(-(-t // 16) for t in args.tokens) + 64
    ns = argparse.Namespace(layout="vllm", layers=32)
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "gpu_pair_bench.py"), "--serve",
                              "--backend", "cuda_ipc", "--blocks", str(blocks)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        addr = child.stdout.readline().strip()[5:]
        d_t, d_spec = build(ns, blocks, 99)
        local_src, _ = build(ns, blocks, 7)
        tr = get_transport("cuda_ipc", timeout=60)
        tr.register(d_t, d_spec)
        peer = tr.connect(addr)
        conn = tr._conn(peer)
        stream = torch.cuda.current_stream()
        rng = np.random.default_rng(0)
        local_regions = kernels.Regions.of([t.view(torch.uint8).reshape(-1) for t in local_src])
        for tokens in args.tokens:
            nblk = -(-tokens // 16)
            segs = plan_segments(peer.spec, d_spec, rng.choice(blocks, nblk, replace=False),
                                 rng.choice(blocks, nblk, replace=False))
            ev = torch.cuda.Event()
            ev.record()
            table = tr._block_table(conn, segs.plan, conn.extra["peer"], tr._local, True)
            sb, db = segs.plan.src_blocks, segs.plan.dst_blocks
            sp = stream.cuda_stream
            ipc_ev, done_ev = conn.extra["event_ptr"], ev.cuda_event
            raw = (*kernels.block_args(table), sb, db, sp)
            ext = kernels._ext
            res = {
                "blocks: ext.copy_blocks, no events": med_idle(lambda: ext.copy_blocks(*raw, 0, 0, -1)),
                "blocks: ext.copy_blocks, done event": med_idle(lambda: ext.copy_blocks(*raw, 0, done_ev, -1)),
                "blocks: ext.copy_blocks, ipc wait": med_idle(lambda: ext.copy_blocks(*raw, ipc_ev, 0, -1)),
                "blocks: ext.copy_blocks, both": med_idle(lambda: ext.copy_blocks(*raw, ipc_ev, done_ev, -1)),
                "blocks: launch_blocks, both": med_idle(lambda: kernels.launch_blocks(table, sb, db, sp, wait_event=ipc_ev,
                                                                                       done_event=done_ev)),
                "blocks: transport._launch": med_idle(lambda: tr._launch(conn, segs, True, "x")),
                "blocks: read (call)": med_idle(lambda: tr.read(peer, segs)),
                "blocks: read+wait": med_idle(lambda: tr.read(peer, segs).wait(60)),
                "blocks: segs.nbytes": med(lambda: segs.nbytes),
                "query ipc event": med(lambda: conn.extra["event"].query()),
                "torch empty launch (_sleep 0)": med_idle(lambda: torch.cuda._sleep(0)),
                "gpu_blocks_ipc_src": gpu_us(lambda: ext.copy_blocks(*raw, 0, 0, -1)),
                "live": med(lambda: tr._live(peer)),
                "wait_ipc_event": med(lambda: stream.wait_event(conn.extra["event"])),
                "event_create_record": med(lambda: torch.cuda.Event().record(stream)),
                "handle_create": med(lambda: _CudaHandle("p", "r", 1, ev, tr)),
                "current_device": med(lambda: torch.cuda.current_device()),
                "copy_launch": med(lambda: kernels.copy_segments(conn.extra["peer"], tr._local, segs.region, segs.src,
                                                                 segs.dst, segs.length, stream=stream), 50),
                "copy+sync": med(lambda: (kernels.copy_segments(conn.extra["peer"], tr._local, segs.region, segs.src,
                                                                segs.dst, segs.length, stream=stream),
                                          stream.synchronize()), 50),
                "read+wait": med(lambda: tr.read(peer, segs).wait(60), 50),
                "read+wait(None)": med(lambda: tr.read(peer, segs).wait(), 50),
                "memcpy+sync(baseline)": med(lambda: tr.baseline(peer, segs.nbytes, 1), 20),
                "gpu_copy_ipc_src": gpu_us(lambda: kernels.copy_segments(conn.extra["peer"], tr._local, segs.region,
                                                                         segs.src, segs.dst, segs.length, stream=stream)),
                "gpu_copy_local_src": gpu_us(lambda: kernels.copy_segments(local_regions, tr._local, segs.region,
                                                                           segs.src, segs.dst, segs.length,
                                                                           stream=stream)),
            }
            saved = conn.extra["event_ptr"]
            conn.extra["event_ptr"] = 0
            res["read+wait(no ipc event wait)"] = med_idle(lambda: tr.read(peer, segs).wait(60), 50)
            conn.extra["event_ptr"] = saved
            print(f"tokens {tokens} ({segs.nbytes / 2**20:.1f} MiB, {len(segs)} segments):")
            for k, v in res.items():
                print(f"  {k:32s} {v:10.1f} us")
        tr.close()
    finally:
        child.stdin.write("quit\n")
        child.stdin.flush()
        child.wait(timeout=20)
    sys.stdout.flush()
    import os
    os._exit(0)


if __name__ == "__main__":
    main()
