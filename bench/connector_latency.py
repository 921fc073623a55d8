"""Pull-mode load latency of the engine-neutral connector: P saves a small request, D loads it,
timed from `load()` until `get_finished()` reports it (the transfer and P's "held?" answer;
the bytes are tiny, so this is the control path's cost). Both sides are stepped in turn, as
their engines would call `get_finished()`.

    python bench/connector_latency.py [--backend tcp] [--requests 60]
"""
from __future__ import annotations

import argparse
import statistics
import time

from p2pkv.connector import KVConnector
from p2pkv.layout import make_kv_caches

SHAPE = dict(num_layers=3, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="tcp", help="tcp or loopback (one process either way)")
    ap.add_argument("--requests", type=int, default=60, help="loads timed; the first 10 are warm-up")
    a = ap.parse_args()
    p, d = KVConnector(a.backend), KVConnector(a.backend)
    try:
        p.register_kv_caches(*make_kv_caches("vllm", num_blocks=16, fill="random", **SHAPE))
        d.register_kv_caches(*make_kv_caches("vllm", num_blocks=12, fill="zeros", **SHAPE))
        times = []
        for i in range(a.requests):
            p.save(f"r{i}", [1, 2, 3])
            t0 = time.perf_counter()
            d.load(f"d{i}", [4, 5, 6], peer=p.address, remote_request_id=f"r{i}", remote_block_ids=[1, 2, 3])
            while f"d{i}" not in d.get_finished().loaded:
                p.get_finished()
                time.sleep(0.0005)
            times.append(time.perf_counter() - t0)
        warm = sorted(times[10:])
        print(f"{a.backend}: median load latency {statistics.median(warm) * 1e3:.2f} ms, "
              f"p90 {warm[int(0.9 * (len(warm) - 1))] * 1e3:.2f} ms over {len(warm)} loads")
    finally:
        p.close()
        d.close()


if __name__ == "__main__":
    main()
