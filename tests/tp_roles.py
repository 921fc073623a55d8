"""Ranks for the tensor-parallel tests, one transport per config (tests/tpcheck.py's caches):
`p BACKEND CFGS TP RANK OPTS`: registers rank RANK of TP's shard of each config's full cache;
`d BACKEND CFGS TP RANK OPTS`: registers rank RANK's cache of TP with seeded random bytes (seed 7 + RANK).
Each prints `ADDR A` per config, then obeys stdin: `dump I PATH` writes config I's tensors (bytes, in
their logical order) to PATH and prints `DUMPED`; `quit` (or EOF) exits."""
from __future__ import annotations

import json
import sys

from peer import serve
from tpcheck import make, p_shard


def shards(configs: list[dict], tp: int, rank: int, role: str) -> list:
    """Rank `rank`'s cache of each config: P's shard of the full cache, or D's seeded random one."""
    return [p_shard(cfg, tp, rank) if role == "p" else make(cfg, tp, rank, "random", seed=7 + rank) for cfg in configs]


if __name__ == "__main__":
    if sys.argv[1] not in ("p", "d"):
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
    role, backend, cfgs, tp, rank, opts = sys.argv[1:7]
    serve(backend, shards(json.loads(cfgs), int(tp), int(rank), role), json.loads(opts))
