"""A peer process for the cuda_ipc tests: builds a seeded CUDA KV cache, registers it
with cuda_ipc (or cfg["backend"]), prints its address, then obeys line commands on stdin:
`notif` waits for one notification and prints it as JSON; `dump PATH` writes the
cache's bytes to PATH; `mark` records its ready event; `quit` (or EOF) exits."""
from __future__ import annotations

import json
import sys
import time

import torch

from p2pkv.layout import make_kv_caches
from p2pkv.transport import get_transport


def build(cfg: dict, device: str = "cuda"):
    g = torch.Generator().manual_seed(cfg.get("seed", 0))
    return make_kv_caches(cfg.get("layout", "vllm"), num_layers=cfg.get("layers", 3), num_blocks=cfg.get("blocks", 32),
                          block_size=cfg.get("block_size", 4), num_kv_heads=cfg.get("heads", 2),
                          head_size=cfg.get("head_size", 8), dtype=cfg.get("dtype", "bf16"), device=device,
                          fill=cfg.get("fill", "random"), generator=g)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    tensors, spec = build(cfg)
    torch.cuda.synchronize()
    tr = get_transport(cfg.get("backend", "cuda_ipc"), **cfg.get("options", {}))
    tr.register(tensors, spec)
    print(f"ADDR {tr.address}", flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "notif":
                deadline = time.time() + 20
                got = []
                while not got and time.time() < deadline:
                    got = tr.get_notifs()
                    time.sleep(0.005)
                print("NOTIF " + json.dumps(got[0].message if got else None), flush=True)
            elif cmd[0] == "dump":
                torch.cuda.synchronize()
                with open(cmd[1], "wb") as f:
                    for t in tensors:
                        f.write(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
                print("DUMPED", flush=True)
            elif cmd[0] == "mark":
                tr.mark_ready()
                print("MARKED", flush=True)
    finally:
        tr.close()


if __name__ == "__main__":
    main()
