"""`p2pkv bench --connector`: the connector's pull load latency against the bare transport read of the
same blocks in the same run, with loads spread over several producer processes (each stepping like an
engine), optionally with one producer frozen (SIGSTOP): only its own loads should suffer."""
from __future__ import annotations

import argparse
import json
import math
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import torch

from p2pkv.bench.errors import BenchError
from p2pkv.bench.requests import ms
from p2pkv.bench.stop import stop_process
from p2pkv.connector import KVConnector
from p2pkv.layout import make_kv_caches, plan_segments
from p2pkv.transport.base import byte_regions

__all__ = ["run", "format_connector_table"]

STEP_S = 0.001  # producers and D call get_finished() this often, as an engine's step would
MAX_D_CACHE = 4 << 30


def _shape(args: argparse.Namespace) -> dict[str, Any]:
    return dict(num_layers=args.layers, block_size=args.block_size, num_kv_heads=args.kv_heads,
                head_size=args.head_size, dtype=args.dtype)


def _cache(layout: str, shape: dict[str, Any], blocks: int, seed: int | None) -> tuple[list[torch.Tensor], Any]:
    if seed is None:
        return make_kv_caches(layout, num_blocks=blocks, fill="zeros", **shape)
    return make_kv_caches(layout, num_blocks=blocks, fill="random", generator=torch.Generator().manual_seed(seed),
                          **shape)


def producer_main(cfg: dict[str, Any]) -> None:
    """One producer process: register a seeded cache, print its address, then hold what the parent asks for
    (one JSON line per command on stdin, answered on stdout) while stepping like an engine."""
    conn = KVConnector(cfg["backend"], hold_timeout=cfg["hold_timeout"])
    conn.register_kv_caches(*_cache(cfg["layout"], cfg["shape"], cfg["blocks"], cfg["seed"]))
    print(json.dumps({"address": conn.address}), flush=True)
    cmds: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            cmds.put(line)
        cmds.put(None)
    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = cmds.get(timeout=STEP_S)
        except queue.Empty:
            conn.get_finished()
            continue
        if line is None:
            break
        cmd = json.loads(line)
        for key in cmd["save"]:
            conn.save(key, cmd["blocks"])
        conn.get_finished()
        print(json.dumps({"saved": len(cmd["save"])}), flush=True)
    conn.close()


class _Producer:
    """A producer process and its command pipe."""

    def __init__(self, cfg: dict[str, Any], timeout: float):
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys, json; from p2pkv.bench.connector import "
                                      "producer_main; producer_main(json.loads(sys.argv[1]))", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = str(self.answer(timeout)["address"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"producer {self.proc.pid} did not answer within {timeout:g} s") from None
        if line is None:
            raise BenchError(f"producer {self.proc.pid} exited with {self.proc.wait()}")
        return json.loads(line)

    def hold(self, keys: list[str], blocks: list[int]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"save": keys, "blocks": blocks}) + "\n")
        self.proc.stdin.flush()

    def freeze(self) -> None:
        """Stop every thread of the producer: a thread that ran on would serve a read and spoil the frozen case."""
        try:
            stop_process(self.proc.pid)
        except TimeoutError as e:
            raise BenchError(f"producer {e}") from None

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()


def _wait_handles(handles: list[Any], t0: float, timeout: float) -> list[float]:
    """Seconds from t0 until each bare read was seen done (polled every STEP_S)."""
    out: list[float | None] = [None] * len(handles)
    end = t0 + timeout
    while any(x is None for x in out):
        now = time.perf_counter()
        if now > end:
            raise BenchError(f"bare reads did not finish within {timeout:g} s")
        for i, h in enumerate(handles):
            if out[i] is None and h.done():
                if h.error is not None:
                    raise BenchError(f"bare read failed: {h.error}")
                out[i] = now - t0
        time.sleep(STEP_S)
    return [float(x) for x in out if x is not None]


def _await_loads(d: KVConnector, count: int, t0: float, limit: float) -> dict[str, tuple[float, bool]]:
    """Step D like an engine until `count` loads ended: each load's seconds from t0 and whether it loaded."""
    done: dict[str, tuple[float, bool]] = {}
    while len(done) < count:
        f = d.get_finished()
        now = time.perf_counter() - t0
        done.update({k: (now, True) for k in f.loaded})
        done.update({k: (now, False) for k in f.failed})
        if now > limit:
            raise BenchError(f"{count - len(done)} loads neither ended nor failed within their timeout")
        time.sleep(STEP_S)
    return done


def _pct(xs: list[float], q: float) -> float:
    """The q-th percentile in ms (`requests.ms`), NaN where a case had no load (e.g. all on the frozen producer)."""
    return ms(xs, q) if xs else float("nan")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (tokens, concurrency) row: connector load p50/p99 against bare reads, bytes verified."""
    backend = args.backend
    shape = _shape(args)
    nblk_max = max(math.ceil(t / args.block_size) for t in args.tokens)
    conc = sorted(set(args.concurrency))
    d_blocks = max(conc) * nblk_max
    one, _ = _cache(args.layout, shape, 1, None)
    need = sum(t.numel() * t.element_size() for t in one) * d_blocks
    if need > MAX_D_CACHE:
        raise BenchError(f"--connector needs {need / 2**30:.1f} GiB of D cache for {max(conc)} concurrent loads of "
                         f"{max(args.tokens)} tokens; use fewer --layers/--kv-heads/--tokens or less concurrency")
    cfg = dict(backend=backend, layout=args.layout, shape=shape, blocks=nblk_max, hold_timeout=args.timeout)
    producers = [_Producer(dict(cfg, seed=args.seed + 1 + i), args.timeout) for i in range(args.producers)]
    # A read still in flight keeps its load open (its blocks may yet be written), so the transport gives up
    # on a silent peer within the load timeout too.
    d = KVConnector(backend, load_timeout=args.load_timeout, timeout=args.load_timeout)
    rows: list[dict[str, Any]] = []
    try:
        dt, dspec = _cache(args.layout, shape, d_blocks, None)
        d.register_kv_caches(dt, dspec)
        pspec = _cache(args.layout, shape, nblk_max, None)[1]
        refs = [byte_regions(*_cache(args.layout, shape, nblk_max, args.seed + 1 + i)) for i in range(args.producers)]
        peers = {p.address: d.transport.connect(p.address) for p in producers}
        cases = ["healthy", "frozen"] if args.freeze_one else ["healthy"]
        for tokens in args.tokens:
            src = list(range(math.ceil(tokens / args.block_size)))
            for c in conc:
                row: dict[str, Any] = {"backend": backend, "tokens": tokens, "concurrency": c,
                                       "producers": args.producers, "verified": True}
                for case in cases:
                    loads, bare, failed, frozen_failed, frozen_own = [], [], 0, 0, 0
                    for it in range(args.warmup + args.iters):
                        keys = [f"t{tokens}c{c}{case[0]}{it}n{n}" for n in range(c)]
                        owner = [(n + it) % len(producers) for n in range(c)]  # every producer, even at c=1
                        for i, p in enumerate(producers):
                            p.hold([k for k, o in zip(keys, owner) if o == i], src)
                        for p in producers:
                            p.answer(args.timeout)
                        if case == "frozen":
                            producers[0].freeze()
                        dst = [[n * len(src) + b for b in range(len(src))] for n in range(c)]
                        t0 = time.perf_counter()
                        for n, k in enumerate(keys):
                            d.load(k, dst[n], peer=producers[owner[n]].address, remote_request_id=k,
                                   remote_block_ids=src)
                        done = _await_loads(d, c, t0, 2 * args.load_timeout + 10)
                        if case == "frozen":
                            producers[0].proc.send_signal(signal.SIGCONT)
                        measured = it >= args.warmup
                        for n, k in enumerate(keys):
                            took, ok = done[k]
                            if case == "frozen" and owner[n] == 0:
                                frozen_failed += not ok
                                frozen_own += 1
                                continue
                            failed += not ok
                            if measured and ok:
                                loads.append(took)
                        if case == "healthy":
                            segs = [plan_segments(pspec, dspec, src, dst[n]) for n in range(c)]
                            if it == args.warmup + args.iters - 1:
                                row["verified"] = all(_same(refs[owner[n]], byte_regions(dt, dspec), segs[n])
                                                      for n in range(c))
                            t0 = time.perf_counter()
                            hs = [d.transport.read(peers[producers[owner[n]].address], segs[n]) for n in range(c)]
                            took_bare = _wait_handles(hs, t0, args.timeout)
                            if measured:
                                bare += took_bare
                    if case == "healthy":
                        row.update(load_p50_ms=_pct(loads, 50), load_p99_ms=_pct(loads, 99),
                                   bare_p50_ms=_pct(bare, 50), bare_p99_ms=_pct(bare, 99), load_failures=failed)
                    else:
                        row.update(frozen_others_p50_ms=_pct(loads, 50), frozen_others_failures=failed,
                                   frozen_own_failed=frozen_failed, frozen_own_loads=frozen_own)
                rows.append(row)
                print(f"[p2pkv bench] connector {tokens} tokens x {c} loads: p50 {row['load_p50_ms']:.3f} ms "
                      f"(bare read {row['bare_p50_ms']:.3f} ms)", file=sys.stderr, flush=True)
    finally:
        d.close()
        for p in producers:
            p.close()
    return rows


def _same(src: list[torch.Tensor], dst: list[torch.Tensor], segs: Any) -> bool:
    """Every segment's bytes in D equal the producer's (its cache rebuilt here from the same seed)."""
    for r, s, t, n in zip(segs.region.tolist(), segs.src.tolist(), segs.dst.tolist(), segs.length.tolist()):
        if not torch.equal(src[r][s:s + n], dst[r][t:t + n]):
            return False
    return True


def format_connector_table(rows: list[dict[str, Any]]) -> str:
    """One line per row: load and bare-read percentiles, and the frozen-producer case where it ran."""
    head = f"{'backend':>8} {'tokens':>6} {'loads':>5} {'load p50':>9} {'p99':>8} {'bare p50':>9} {'p99':>8} " \
           f"{'+ms p50':>8} {'frozen: others p50':>18} {'own failed':>10} {'verified':>8}"
    out = [head]
    for r in rows:
        frozen = (f"{r['frozen_others_p50_ms']:>18.3f} {r['frozen_own_failed']:>4}/{r['frozen_own_loads']:<5}"
                  if "frozen_others_p50_ms" in r else f"{'-':>18} {'-':>10}")
        out.append(f"{r['backend']:>8} {r['tokens']:>6} {r['concurrency']:>5} {r['load_p50_ms']:>9.3f} "
                   f"{r['load_p99_ms']:>8.3f} {r['bare_p50_ms']:>9.3f} {r['bare_p99_ms']:>8.3f} "
                   f"{r['load_p50_ms'] - r['bare_p50_ms']:>8.3f} {frozen} {str(r['verified']):>8}")
    return "\n".join(out) + (
        "\nload: connector.load() until get_finished() reports it (ms); bare: transport.read of the same blocks "
        "in the same run;\n+ms p50: what the connector adds; frozen: one producer SIGSTOPped, the other "
        "producers' loads (p50) and how many of its own failed")

