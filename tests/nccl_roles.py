"""Processes for the nccl backend's tests, checking bytes against the seeded caches of tests/peer.py.

`d ADDR CFG OPTS READS SEED`: connect to a P at ADDR, read READS random block sets,
verify each byte-exact, print `OK READS`.
`busy-p CFG OPTS`: a P whose process has a pure-Python thread spinning (as an engine's does);
prints `ADDR A`, then on the stdin line `threads` prints `THREADS` and the names of its Python
threads as JSON, and exits on `quit` (or EOF).
Under `python -m torch.distributed.run --nproc-per-node 2 nccl_roles.py torchrun OUT CFGS`:
rank 0 is P, rank 1 is D (they meet through torchrun's store); D writes a JSON verdict to OUT.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from kvcheck import assert_same, expected_after
from p2pkv.layout import plan_segments
from p2pkv.transport import get_transport
from peer import build


def read_and_check(tr, peer, cfg: dict, reads: int, seed: int) -> None:
    """Read random P blocks into random local blocks; assert D equals P there and is untouched elsewhere."""
    mine, spec = tr.tensors, tr.spec
    p_tensors, _ = build(cfg)
    nb = spec.num_blocks
    rng = np.random.default_rng(seed)
    for i in range(reads):
        before = [t.clone() for t in mine]
        n = int(rng.integers(1, nb))
        src, dst = rng.choice(nb, n, replace=False), rng.choice(nb, n, replace=False)
        tr.read(peer, plan_segments(peer.spec, spec, src, dst), request_id=f"check-{seed}-{i}").wait(tr.timeout)
        assert_same(mine, expected_after(cfg["layout"], before, p_tensors, src, dst))


def role_d(addr: str, cfg: dict, opts: dict, reads: int, seed: int) -> None:
    tensors, spec = build({**cfg, "seed": 1000 + seed})
    with get_transport("nccl", **opts) as tr:
        tr.register(tensors, spec)
        read_and_check(tr, tr.connect(addr), cfg, reads, seed)
    print(f"OK {reads}", flush=True)


def role_busy_p(cfg: dict, opts: dict) -> None:
    import threading
    tensors, spec = build(cfg)
    stop = threading.Event()

    def spin() -> None:  # pure Python, never releases the GIL of its own accord
        n = 0
        while not stop.is_set():
            n += 1
    spinner = threading.Thread(target=spin, name="engine-spin", daemon=True)
    with get_transport("nccl", **opts) as tr:
        tr.register(tensors, spec)
        spinner.start()
        print(f"ADDR {tr.address}", flush=True)
        for line in sys.stdin:
            if line.strip() == "threads":
                print("THREADS " + json.dumps(sorted(t.name for t in threading.enumerate())), flush=True)
            elif line.strip() == "quit":
                break
        stop.set()
    spinner.join()


def role_torchrun(out: str, configs: list[dict]) -> None:
    import datetime

    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          False, datetime.timedelta(seconds=60))
    key = f"p2pkv-test/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if rank == 0:
        trs = []
        for i, cfg in enumerate(configs):
            tensors, spec = build(cfg)
            tr = get_transport("nccl", timeout=30)
            tr.register(tensors, spec)
            trs.append(tr)
            store.set(f"{key}/addr/{i}", tr.address)
        store.wait([f"{key}/done"], datetime.timedelta(seconds=120))
        for tr in trs:
            tr.close()
        return
    verdict = {}
    for i, cfg in enumerate(configs):
        store.wait([f"{key}/addr/{i}"], datetime.timedelta(seconds=60))
        tensors, spec = build({**cfg, "seed": 500 + i})
        with get_transport("nccl", timeout=30) as tr:
            tr.register(tensors, spec)
            try:
                read_and_check(tr, tr.connect(store.get(f"{key}/addr/{i}").decode()), cfg, 3, i)
                verdict[cfg["layout"]] = "ok"
            except AssertionError as e:
                verdict[cfg["layout"]] = f"mismatch: {e}"
    with open(out, "w") as f:
        json.dump(verdict, f)
    store.set(f"{key}/done", "1")


if __name__ == "__main__":
    if sys.argv[1] == "d":
        role_d(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif sys.argv[1] == "busy-p":
        role_busy_p(json.loads(sys.argv[2]), json.loads(sys.argv[3]))
    elif sys.argv[1] == "torchrun":
        role_torchrun(sys.argv[2], json.loads(sys.argv[3]))
    else:
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
