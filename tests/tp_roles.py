"""A P rank for the tensor-parallel tests: `p BACKEND CFGS TP RANK OPTS` registers, one transport per
config, rank RANK of TP's shard of each config's full cache (tests/tpcheck.py), prints `ADDR A` for
each, then serves until `quit` (or EOF) on stdin."""
from __future__ import annotations

import json
import sys

from p2pkv.transport import get_transport
from tpcheck import p_shard


def role_p(backend: str, configs: list[dict], tp: int, rank: int, opts: dict) -> None:
    transports = []
    try:
        for cfg in configs:
            tensors, spec = p_shard(cfg, tp, rank)
            tr = get_transport(backend, **opts)
            transports.append(tr)
            tr.register(tensors, spec)
            print(f"ADDR {tr.address}", flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
    finally:
        for tr in transports:
            tr.close()


if __name__ == "__main__":
    if sys.argv[1] != "p":
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
    role_p(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6]))
