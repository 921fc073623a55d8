"""The idle measurement: random non-contiguous P blocks into other random D blocks, each read timed next to a
raw-link baseline of the same bytes, summed up as one result row of the JSON contract."""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pkv.bench.cache import num_blocks
from p2pkv.bench.progress import progress
from p2pkv.layout import KVCacheSpec, plan_segments
from p2pkv.segments import Segments
from p2pkv.transport import Peer, Transport

__all__ = ["Request", "plan", "last_writers", "PeakRss", "timed_read", "run_idle", "ms", "result_row"]


@dataclass(frozen=True)
class Request:
    """One planned read: P blocks `src` into D blocks `dst`, posted as `segs`."""
    src: np.ndarray
    dst: np.ndarray
    segs: Segments


def plan(args: argparse.Namespace, rng: np.random.Generator, p_spec: KVCacheSpec, d_spec: KVCacheSpec,
         tokens: int) -> list[list[Request]]:
    """Every iteration's requests for one --tokens value, drawn once so that every case posts the same ones."""
    _, nb = num_blocks(args)
    nblk = -(-tokens // args.block_size)
    out = []
    for _ in range(args.warmup + args.iters):
        dst_perm = rng.permutation(nb)
        srcs = [rng.choice(nb, nblk, replace=False) for _ in range(args.requests)]
        dsts = [dst_perm[r * nblk:(r + 1) * nblk] for r in range(args.requests)]
        out.append([Request(s, d, plan_segments(p_spec, d_spec, s, d)) for s, d in zip(srcs, dsts)])
    return out


def last_writers(requests: list[list[Request]]) -> dict[int, int]:
    """For each D block the plan writes, the P block written last (what verification expects there)."""
    last: dict[int, int] = {}
    for reqs in requests:
        for req in reqs:
            last.update(zip(req.dst.tolist(), req.src.tolist()))
    return last


class PeakRss:
    """D's peak RSS over the transfers, sampled until the first baseline buffer exists."""

    def __init__(self) -> None:
        self.mib, self.frozen = 0.0, False

    def sample(self) -> None:
        if not self.frozen:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_read(tr: Transport, peer: Peer, segs: Segments, request_id: str, timeout: float) -> float:
    """Seconds from posting a read to its wait() returning."""
    t0 = time.perf_counter()
    tr.read(peer, segs, request_id=request_id).wait(timeout)
    return time.perf_counter() - t0


def run_idle(tr: Transport, peer: Peer, args: argparse.Namespace, backend: str, tokens: int,
             requests: list[list[Request]], peak: PeakRss) -> tuple[list[float], list[float]]:
    """The plan's reads with nothing else running, each measured one next to a raw-link baseline of its bytes."""
    lat: list[float] = []
    base: list[float] = []
    t_start = time.perf_counter()
    for it, reqs in enumerate(requests):
        measured = it >= args.warmup
        for r, req in enumerate(reqs):
            # The baseline runs interleaved with the requests, so both see the same machine load, and
            # every other time first, so neither always runs right after the previous read (caches cold).
            base_first = measured and len(lat) % 2 == 1
            if base_first:
                base.append(tr.baseline(peer, req.segs.nbytes, 1))
            dt = timed_read(tr, peer, req.segs, f"bench-{tokens}-{it}-{r}", args.timeout)
            peak.sample()
            if measured:
                peak.frozen = True
                if not base_first:
                    base.append(tr.baseline(peer, req.segs.nbytes, 1))
                lat.append(dt)
        if time.perf_counter() - t_start > 2 or it == len(requests) - 1:
            nbytes = reqs[-1].segs.nbytes
            progress(f"{backend} {tokens} tokens: iteration {it + 1}/{len(requests)}, "
                     f"last request {nbytes / max(lat[-1] if lat else 1, 1e-9) / 1e9:.2f} GB/s")
            t_start = time.perf_counter()
    return lat, base


def ms(seconds: list[float], q: float = 50) -> float:
    """The q-th percentile of `seconds`, in milliseconds."""
    return round(float(np.percentile(seconds, q)) * 1e3, 4)


def result_row(args: argparse.Namespace, backend: str, tokens: int, segs: Segments, lat: list[float],
               base: list[float]) -> dict[str, Any]:
    """The JSON contract's row for one --tokens value; `verified` is filled in once D's cache is checked."""
    gbps = segs.nbytes / statistics.median(lat) / 1e9
    bgbps = segs.nbytes / statistics.median(base) / 1e9
    return {"backend": backend, "device": args.device, "layout": args.layout, "dtype": args.dtype,
            "tokens": tokens, "requests": args.requests, "bytes": segs.nbytes, "segments": len(segs),
            "gbps": round(gbps, 4), "baseline_gbps": round(bgbps, 4), "ratio": round(gbps / bgbps, 4),
            "p50_ms": ms(lat), "p99_ms": ms(lat, 99), "verified": False}
