"""A P process for multi-process tests: builds seeded random caches (one transport
per config), prints each listening address, then obeys line commands on stdin:
`dump I PATH` writes cache I's raw bytes to PATH; `freeze S` prints FROZEN, then holds the GIL in
pure Python for S seconds (an engine that never yields: no Python thread of p2pkv can run);
`quit` (or EOF) exits."""
from __future__ import annotations

import json
import sys
import time

import torch

from p2pkv.layout import make_kv_caches
from p2pkv.transport import get_transport


def build(cfg: dict, seed_offset: int = 0):
    g = torch.Generator().manual_seed(cfg.get("seed", 0) + seed_offset)
    return make_kv_caches(cfg["layout"], num_layers=cfg.get("layers", 2), num_blocks=cfg.get("blocks", 24),
                          block_size=cfg.get("block_size", 4), num_kv_heads=cfg.get("heads", 2),
                          head_size=cfg.get("head_size", 8), dtype=cfg.get("dtype", "bf16"), fill="random", generator=g)


def serve(backend: str, built: list, opts: dict) -> None:
    """Register each (tensors, spec) on a transport of its own, print its address, then obey stdin."""
    caches, transports = [], []
    try:
        for tensors, spec in built:
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
            if cmd[0] == "freeze":
                sys.setswitchinterval(1000.0)  # other threads would wait this long for the GIL
                print("FROZEN", flush=True)
                end = time.monotonic() + float(cmd[1])
                while time.monotonic() < end:
                    pass
                sys.setswitchinterval(0.005)
                print("THAWED", flush=True)
    finally:
        for tr in transports:
            tr.close()


def main() -> None:
    backend, configs = sys.argv[1], json.loads(sys.argv[2])
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    serve(backend, [build(cfg) for cfg in configs], opts)


if __name__ == "__main__":
    main()
