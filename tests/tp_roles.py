"""Ranks for the tensor-parallel tests, one transport per config (tests/tpcheck.py's caches):
`p BACKEND CFGS TP RANK OPTS`: registers rank RANK of TP's shard of each config's full cache;
`d BACKEND CFGS TP RANK OPTS`: registers rank RANK's cache of TP with seeded random bytes (seed 7 + RANK).
Each prints `ADDR A` per config, then obeys stdin: `dump I PATH` writes config I's tensors (bytes, in
their logical order) to PATH and prints `DUMPED`; `quit` (or EOF) exits."""
from __future__ import annotations

import json
import sys

import torch

from p2pkv.transport import get_transport
from tpcheck import make, p_shard


def serve(backend: str, configs: list[dict], tp: int, rank: int, opts: dict, role: str) -> None:
    transports, caches = [], []
    try:
        for cfg in configs:
            tensors, spec = p_shard(cfg, tp, rank) if role == "p" else make(cfg, tp, rank, "random", seed=7 + rank)
            tr = get_transport(backend, **opts)
            transports.append(tr)
            tr.register(tensors, spec)
            caches.append(tensors)
            print(f"ADDR {tr.address}", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "dump":
                with open(cmd[2], "wb") as f:
                    for t in caches[int(cmd[1])]:
                        f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
                print("DUMPED", flush=True)
    finally:
        for tr in transports:
            tr.close()


if __name__ == "__main__":
    if sys.argv[1] not in ("p", "d"):
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
    role, backend, cfgs, tp, rank, opts = sys.argv[1:7]
    serve(backend, json.loads(cfgs), int(tp), int(rank), json.loads(opts), role)
