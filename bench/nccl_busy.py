"""D's read latency on the nccl backend (gloo, CPU) with a pure-Python thread spinning in P's process,
against the same spin in a separate process (issue 17's "P busy" case); median of 12 reads after 3
warm-ups, at 1 block (16 tokens, 256 KiB) and 32 blocks (512 tokens, 8 MiB).

    PYTHONPATH=. python bench/nccl_busy.py .      # the argument: the p2pkv checkout to measure
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

root = sys.argv[1]
sys.path.insert(0, os.path.join(root, "tests"))
from peer import build

from p2pkv.layout import plan_segments
from p2pkv.transport import get_transport

cfg = {"layout": "vllm_cpu", "seed": 3, "layers": 4, "blocks": 64, "block_size": 16, "heads": 8, "head_size": 128}
def run(role):
    args = [sys.executable, os.path.join(root, "tests", "nccl_roles.py"), "busy-p", json.dumps(cfg), "{}"] if role == "busy" \
        else [sys.executable, os.path.join(root, "tests", "peer.py"), "nccl", json.dumps([cfg])]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root})
    addr = p.stdout.readline().split()[1]
    d, spec = build({**cfg, "seed": 9})
    out = {}
    with get_transport("nccl", timeout=30) as tr:
        tr.register(d, spec); peer = tr.connect(addr)
        rng = np.random.default_rng(0)
        for n in (1, 32):
            ts = []
            for i in range(15):
                src, dst = rng.choice(64, n, replace=False), rng.choice(64, n, replace=False)
                segs = plan_segments(peer.spec, spec, src, dst)
                t0 = time.perf_counter(); tr.read(peer, segs, f"r{i}").wait(30); ts.append(time.perf_counter() - t0)
            out[n] = round(float(np.median(ts[3:])) * 1e3, 2)
    p.stdin.write("quit\n"); p.stdin.flush(); p.wait()
    return out
spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    apart = run("idle")
finally:
    spinner.kill(); spinner.wait()
busy = run("busy")
print(root, "p50 ms: spin in another process", apart, "spin in P's process", busy, "ratio", {k: round(busy[k] / apart[k], 2) for k in apart})
