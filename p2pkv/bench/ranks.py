"""P's and D's sides of a run, and the two ways they meet: a local pair (P here, D as a child process that
reports on stdout) or torchrun (rank 0 is P, rank 1 is D, meeting through torchrun's store)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.bench.args import backend_options
from p2pkv.bench.busy import BUSY_TAG, BusyCases, PBusyLoad, StoreBusyChannel
from p2pkv.bench.cache import D_SEED, P_SEED, build, device_of, verify
from p2pkv.bench.errors import BenchError
from p2pkv.bench.progress import progress
from p2pkv.bench.requests import PeakRss, last_writers, plan, result_row, run_idle
from p2pkv.transport import Transport, get_transport

__all__ = ["RESULT_TAG", "run_d", "run_p", "local_pair", "torchrun_pair"]

RESULT_TAG = "P2PKV_RESULT "


def _rss_mib() -> float:
    """Resident memory now (the interpreter and libraries, before the cache exists)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_d(args: argparse.Namespace, backend: str, p_address: str,
          ask_p: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """D's side: read random P blocks into random D blocks, time it, verify, return result rows.

    With `ask_p` (--busy) the same reads are measured again with P or D busy, each case verified on its own."""
    device = device_of(args)
    rss_base = _rss_mib()
    tensors, spec = build(args, device, D_SEED + args.seed, side="D")
    tr: Transport = get_transport(backend, **backend_options(args, backend))
    rows = []
    try:
        tr.register(tensors, spec)
        peer = tr.connect(p_address)
        rng = np.random.default_rng(args.seed)
        peak = PeakRss()
        last_src: dict[int, int] = {}
        for tokens in args.tokens:
            requests = plan(args, rng, peer.spec, spec, tokens)
            lat, base = run_idle(tr, peer, args, backend, tokens, requests, peak)
            row = result_row(args, backend, tokens, requests[-1][-1].segs, lat, base)
            if ask_p is None:
                last_src.update(last_writers(requests))
            else:
                busy = BusyCases(tr, peer, args, backend, tokens, requests, tensors, ask_p)
                row.update(busy.measure(idle_p50_ms=row["p50_ms"]))
            rows.append(row)
        if ask_p is None:
            progress("D: verifying every byte of its cache")
            _sync(device)
            ok = verify(args, tensors, last_src)
            for row in rows:
                row["verified"] = ok
        cache_mib = sum(r.nbytes for r in spec.regions) / 2**20
        for row in rows:
            row.update(cache_mib=round(cache_mib, 1), d_rss_base_mib=round(rss_base, 1),
                       d_peak_rss_mib=round(peak.mib, 1))
        tr.send_notif(peer, {"bench": "done"})
    finally:
        tr.close()
    return rows


def run_p(args: argparse.Namespace, backend: str, publish: Callable[[str], None],
          collect: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """P's side: register the random cache, serve D until it reports, return D's rows."""
    device = device_of(args)
    tr: Transport = get_transport(backend, **backend_options(args, backend))
    try:
        tensors, spec = build(args, device, P_SEED + args.seed, side="P")
        tr.register(tensors, spec)
        publish(tr.address)
        return collect()
    finally:
        tr.close()


def _child_argv(args: argparse.Namespace, backend: str, address: str) -> list[str]:
    argv = [sys.executable, "-m", "p2pkv", "bench", "--role", "d", "--connect", address, "--backend", backend,
            "--device", args.device, "--layers", str(args.layers), "--block-size", str(args.block_size),
            "--kv-heads", str(args.kv_heads), "--head-size", str(args.head_size), "--dtype", args.dtype,
            "--layout", args.layout, "--requests", str(args.requests), "--iters", str(args.iters),
            "--warmup", str(args.warmup), "--timeout", str(args.timeout), "--seed", str(args.seed),
            "--tokens", *map(str, args.tokens)] + (["--busy"] if args.busy else [])
    for o in args.option:
        argv += ["--option", o]
    return argv


def local_pair(args: argparse.Namespace, backend: str) -> list[dict[str, Any]]:
    """P in this process and D as its child; D's rows come back on the child's stdout."""
    child: list[subprocess.Popen] = []

    # NCCL refuses two ranks on one GPU: D takes the second device, as rank 1 of torchrun would
    env = {**os.environ, "LOCAL_RANK": "1"} if backend == "nccl" and args.device == "cuda" else None

    def publish(address: str) -> None:
        child.append(subprocess.Popen(_child_argv(args, backend, address), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env))

    def collect() -> list[dict[str, Any]]:
        proc, rows = child[0], None
        with PBusyLoad() as load:
            for line in proc.stdout:
                if line.startswith(BUSY_TAG):
                    mode = line[len(BUSY_TAG):].strip()
                    load.set(mode)
                    proc.stdin.write(f"ok {mode}\n")
                    proc.stdin.flush()
                elif line.startswith(RESULT_TAG):
                    rows = json.loads(line[len(RESULT_TAG):])
        if proc.wait() != 0:
            raise BenchError(f"the D process failed (exit {proc.returncode}); see its messages above")
        if rows is None:
            raise BenchError("the D process ended without results")
        return rows
    try:
        return run_p(args, backend, publish, collect)
    finally:
        for c in child:
            if c.poll() is None:
                c.kill()
                c.wait()


def torchrun_pair(args: argparse.Namespace, backend: str) -> list[dict[str, Any]] | None:
    """This rank's side under torchrun: rank 0 (P) returns the rows, every other rank None."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    key = f"p2pkv/bench/{backend}"
    channel = StoreBusyChannel(store, key, args.timeout * 20) if args.busy else None
    if rank == 0:
        def collect() -> list[dict[str, Any]]:
            if channel is not None:
                with PBusyLoad() as load:
                    channel.serve(load)
            store.wait([key + "/result"], datetime.timedelta(seconds=args.timeout * 20))
            return json.loads(store.get(key + "/result").decode())
        return run_p(args, backend, lambda a: store.set(key + "/addr", a), collect)
    if rank == 1:
        store.wait([key + "/addr"])
        try:
            rows = run_d(args, backend, store.get(key + "/addr").decode(), channel.ask if channel else None)
        finally:
            if channel is not None:
                channel.end()
        store.set(key + "/result", json.dumps(rows))
    return None
