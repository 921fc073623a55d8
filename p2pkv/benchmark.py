"""`p2pkv bench`: a P rank and a D rank build the same paged KV cache, D reads
random non-contiguous P blocks into other random D blocks, every byte is
verified, and each row stands next to a same-run baseline of the raw link.

Without torchrun the command starts P here and D as a child process; under
torchrun rank 0 is P and rank 1 is D and they meet through torchrun's store.
With --busy the same requests run again with P's or D's engine thread busy in
pure Python (DESIGN.md, "Threads and the GIL"), each against the idle run.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.layout import PRESETS, KVCacheSpec, dtype_from_name, make_kv_caches, plan_segments
from p2pkv.segments import Segments
from p2pkv.transport import (Peer, TransferTimeout, Transport, available_transports, get_transport,
                             transport_factory)

__all__ = ["add_arguments", "main", "format_table", "format_busy_table", "PBusyLoad"]

log = logging.getLogger("p2pkv.bench")
RESULT_TAG = "P2PKV_RESULT "
P_SEED, D_SEED = 1234, 98765


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, refused with the bound in the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


MAX_TIMEOUT = 1e6


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds in (0, MAX_TIMEOUT] (sockets refuse larger ones)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="tcp", help="transport(s), comma separated: tcp, nccl, ucx, cuda_ipc")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both KV caches live")
    p.add_argument("--layers", type=_at_least(1), default=32, help="KV layers (one tensor each, except cross_layer)")
    p.add_argument("--block-size", type=_at_least(1), default=16, help="tokens per KV block")
    p.add_argument("--kv-heads", type=_at_least(1), default=8, help="KV heads per layer")
    p.add_argument("--head-size", type=_at_least(1), default=128, help="elements per head")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or fp8 (e4m3)")
    p.add_argument("--layout", default="vllm", choices=list(PRESETS), help="KV tensor layout preset")
    p.add_argument("--tokens", type=_at_least(1), nargs="+", default=[2048],
                   help="tokens per request (several values: one row each)")
    p.add_argument("--requests", type=_at_least(1), default=4, help="requests per iteration, each its own random blocks")
    p.add_argument("--iters", type=_at_least(1), default=5, help="measured iterations")
    p.add_argument("--warmup", type=_at_least(0), default=1, help="iterations run first and not measured")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here (by P / rank 0)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against tokens per request (needs matplotlib)")
    p.add_argument("--timeout", type=_seconds, default=120.0, help="seconds before a stalled transfer is an error")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random caches and block choices")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option passed to get_transport (repeatable), e.g. pack_threshold=65536")
    p.add_argument("--busy", action="store_true",
                   help="also measure the same reads with P's engine busy (a pure-Python thread in its process, "
                        "against the same spin in another process) and with D's thread as an engine loop "
                        "(1 ms of Python between done() polls), each against the idle run")
    p.add_argument("--role", choices=["p", "d"], help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------- cache

def _num_blocks(args: argparse.Namespace) -> tuple[int, int]:
    per_req = max(-(-t // args.block_size) for t in args.tokens)
    return per_req, per_req * args.requests + max(8, per_req * args.requests // 8)


def _cache_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """Bytes of one rank's KV cache and of its largest tensor (D's verification holds two more of those)."""
    _, nb = _num_blocks(args)
    block, heads, head = args.block_size, args.kv_heads, args.head_size
    per_block = block * head if args.layout == "mla" else 2 * block * heads * head
    per_layer = nb * per_block * dtype_from_name(args.dtype).itemsize
    total = per_layer * args.layers
    return total, total if args.layout == "cross_layer" else per_layer


FILL_CHUNK = 4 << 20


def _fill(region: torch.Tensor, seed: int) -> None:
    """Deterministic random bytes, made 4 MiB at a time so that filling (and re-making
    the expected bytes when verifying) never holds a second copy of a region."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, region.numel(), FILL_CHUNK):
        part = region[start:start + FILL_CHUNK]
        part.copy_(torch.randint(0, 256, (part.numel(),), dtype=torch.uint8, generator=g).to(region.device))


def _build(args: argparse.Namespace, device: str, seed: int) -> tuple[list[torch.Tensor], KVCacheSpec]:
    _, nb = _num_blocks(args)
    tensors, spec = make_kv_caches(args.layout, num_layers=args.layers, num_blocks=nb, block_size=args.block_size,
                                   num_kv_heads=args.kv_heads, head_size=args.head_size, dtype=args.dtype, device=device)
    for i, t in enumerate(tensors):
        _fill(t.view(torch.uint8).view(-1), seed + i)
    return tensors, spec


def _block_dim(layout: str) -> int:
    return 1 if layout == "vllm" else 0


def _verify(args: argparse.Namespace, tensors: list[torch.Tensor], last_src: dict[int, int]) -> bool:
    """D's cache equals P's on every written block (last writer wins) and its own initial bytes elsewhere,
    checked with plain tensor indexing, independent of the segment planner."""
    bdim = _block_dim(args.layout)
    order = sorted(last_src)
    dst = torch.tensor(order, dtype=torch.long, device=tensors[0].device)
    src = torch.tensor([last_src[d] for d in order], dtype=torch.long, device=tensors[0].device)
    ok = True
    for i, t in enumerate(tensors):
        got = t.view(torch.uint8)
        expect, p_bytes = torch.empty_like(got), torch.empty_like(got)
        _fill(expect.view(-1), D_SEED + args.seed + i)
        _fill(p_bytes.view(-1), P_SEED + args.seed + i)
        expect.index_copy_(bdim, dst, p_bytes.index_select(bdim, src))
        ok = ok and torch.equal(expect, got)
        del expect, p_bytes
    return bool(ok)


# --------------------------------------------------------------------------------------------- roles

_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool, int), "str": (str,),
                                       "bytes": (str,), "None": (type(None),), "dict": (dict,), "list": (list,)}


def _constructor_params(backend: str) -> dict[str, inspect.Parameter] | None:
    """The keyword options a backend's constructor chain takes (raises for an unknown backend); None when
    the chain ends open (**kw), so any key may be valid."""
    params: dict[str, inspect.Parameter] = {}
    for cls in getattr(transport_factory(backend), "__mro__", ()):
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        sig = inspect.signature(init)
        params.update({n: p for n, p in sig.parameters.items() if n != "self" and n not in params
                       and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)})
        if all(p.kind is not p.VAR_KEYWORD for p in sig.parameters.values()):
            return params
    return None


def _kinds(annotation: Any) -> tuple[list[str], tuple[type, ...]]:
    """The names and Python types an annotation allows; no types when it names something else."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "?")
    names = [a.strip().split("[")[0] for a in text.split("|")]
    return names, tuple(k for n in names for k in _KINDS[n]) if all(n in _KINDS for n in names) else ()


def _options(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """--timeout and the --option pairs for `backend`, each value read as JSON unless the backend wants text;
    a key the backend does not take, or a value of another kind, is refused before any cache is built."""
    params = _constructor_params(backend)
    out: dict[str, Any] = {"timeout": args.timeout}
    for kv in args.option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--option {kv!r} is not KEY=VALUE")
        try:
            value = json.loads(v)
        except ValueError:
            value = v
        if params is not None:
            if k not in params:
                raise ValueError(f"--option {k}: backend {backend!r} takes no such option; "
                                 f"it takes {', '.join(sorted(params))}")
            names, kinds = _kinds(params[k].annotation)
            if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
                if str not in kinds:
                    raise ValueError(f"--option {k}={v!r}: backend {backend!r} expects {' or '.join(names)}")
                value = v
        out[k] = value
    return out


def _check_output(flag: str, path: str | None) -> None:
    """Refuse a --json or --plot path that cannot be written, before the run rather than after it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "bench.png" if flag == "--plot" else "bench.json")
        raise ValueError(f"{flag} {path!r} is a folder; give a file path such as {example!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: folder {folder!r} does not exist; create it first")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if flag == "--plot" and ext:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext not in kinds:
            raise ValueError(f"--plot {path!r}: matplotlib cannot write .{ext}; use one of {', '.join(sorted(kinds))}")


def _available_memory(device: str) -> int | None:
    """Bytes free now for the cache: host MemAvailable, or the free memory of this rank's GPU; None if unknown."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(args: argparse.Namespace, local_pair: bool) -> None:
    """Refuse a shape whose caches cannot fit, before allocating: P's and D's caches (both here without
    torchrun, on one host or GPU) plus D's two verification copies of its largest tensor."""
    cache, largest = _cache_bytes(args)
    is_d = local_pair or int(os.environ.get("RANK", "0")) == 1
    need = cache * (2 if local_pair and args.device == "cpu" else 1) + (2 * largest if is_d else 0)
    free = _available_memory(args.device)
    if free is not None and need > free:
        raise ValueError(f"this run needs {need / 2**30:.1f} GiB of {args.device} memory ({cache / 2**30:.1f} GiB "
                         f"of KV cache per rank) but {free / 2**30:.1f} GiB is available; "
                         "lower --tokens, --requests or --layers")


def _device(args: argparse.Namespace) -> str:
    if args.device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device here")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local % torch.cuda.device_count()}"


def _rss_mib() -> float:
    """Resident memory now (the interpreter and libraries, before the cache exists)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class _Request:
    """One planned read: P blocks `src` into D blocks `dst`, posted as `segs`."""
    src: np.ndarray
    dst: np.ndarray
    segs: Segments


def _plan(args: argparse.Namespace, rng: np.random.Generator, p_spec: KVCacheSpec, d_spec: KVCacheSpec,
          tokens: int) -> list[list[_Request]]:
    """Every iteration's requests for one --tokens value, drawn once so that every case posts the same ones."""
    _, nb = _num_blocks(args)
    nblk = -(-tokens // args.block_size)
    plan = []
    for _ in range(args.warmup + args.iters):
        dst_perm = rng.permutation(nb)
        srcs = [rng.choice(nb, nblk, replace=False) for _ in range(args.requests)]
        dsts = [dst_perm[r * nblk:(r + 1) * nblk] for r in range(args.requests)]
        plan.append([_Request(s, d, plan_segments(p_spec, d_spec, s, d)) for s, d in zip(srcs, dsts)])
    return plan


def _last_writers(plan: list[list[_Request]]) -> dict[int, int]:
    """For each D block the plan writes, the P block written last (what verification expects there)."""
    last: dict[int, int] = {}
    for reqs in plan:
        for req in reqs:
            last.update(zip(req.dst.tolist(), req.src.tolist()))
    return last


class _PeakRss:
    """D's peak RSS over the transfers, sampled until the first baseline buffer exists."""

    def __init__(self) -> None:
        self.mib, self.frozen = 0.0, False

    def sample(self) -> None:
        if not self.frozen:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_read(tr: Transport, peer: Peer, segs: Segments, request_id: str, timeout: float) -> float:
    """Seconds from posting a read to its wait() returning."""
    t0 = time.perf_counter()
    tr.read(peer, segs, request_id=request_id).wait(timeout)
    return time.perf_counter() - t0


def _run_idle(tr: Transport, peer: Peer, args: argparse.Namespace, backend: str, tokens: int,
              plan: list[list[_Request]], peak: _PeakRss) -> tuple[list[float], list[float]]:
    """The plan's reads with nothing else running, each measured one next to a raw-link baseline of its bytes."""
    lat: list[float] = []
    base: list[float] = []
    t_start = time.perf_counter()
    for it, reqs in enumerate(plan):
        measured = it >= args.warmup
        for r, req in enumerate(reqs):
            # The baseline runs interleaved with the requests, so both see the same machine load, and
            # every other time first, so neither always runs right after the previous read (caches cold).
            base_first = measured and len(lat) % 2 == 1
            if base_first:
                base.append(tr.baseline(peer, req.segs.nbytes, 1))
            dt = _timed_read(tr, peer, req.segs, f"bench-{tokens}-{it}-{r}", args.timeout)
            peak.sample()
            if measured:
                peak.frozen = True
                if not base_first:
                    base.append(tr.baseline(peer, req.segs.nbytes, 1))
                lat.append(dt)
        if time.perf_counter() - t_start > 2 or it == len(plan) - 1:
            nbytes = reqs[-1].segs.nbytes
            _progress(f"[p2pkv bench] {backend} {tokens} tokens: iteration {it + 1}/{len(plan)}, "
                      f"last request {nbytes / max(lat[-1] if lat else 1, 1e-9) / 1e9:.2f} GB/s")
            t_start = time.perf_counter()
    return lat, base


def _ms(seconds: list[float], q: float = 50) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 4)


def _row(args: argparse.Namespace, backend: str, tokens: int, segs: Segments, lat: list[float],
         base: list[float]) -> dict[str, Any]:
    """The JSON contract's row for one --tokens value; `verified` is filled in once D's cache is checked."""
    gbps = segs.nbytes / statistics.median(lat) / 1e9
    bgbps = segs.nbytes / statistics.median(base) / 1e9
    return {"backend": backend, "device": args.device, "layout": args.layout, "dtype": args.dtype,
            "tokens": tokens, "requests": args.requests, "bytes": segs.nbytes, "segments": len(segs),
            "gbps": round(gbps, 4), "baseline_gbps": round(bgbps, 4), "ratio": round(gbps / bgbps, 4),
            "p50_ms": _ms(lat), "p99_ms": _ms(lat, 99), "verified": False}


# --------------------------------------------------------------------------------------------- busy engines

BUSY_SLICE_S = 1e-3
BUSY_TAG = "P2PKV_BUSY "
BUSY_MODES = ("idle", "thread", "process")


def _burn(seconds: float) -> int:
    """Pure-Python integer arithmetic for `seconds`: it holds the GIL throughout, as an engine's Python does.
    Self-contained, so that the separate spin process runs this very source."""
    import time
    end = time.perf_counter() + seconds
    x = 1
    while time.perf_counter() < end:
        for _ in range(100):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


def _spin_program() -> str:
    """A bare interpreter's program that runs the same `_burn` forever (no torch import, so it starts at once)."""
    return inspect.getsource(_burn) + f"print('spinning', flush=True)\nwhile True:\n    _burn({BUSY_SLICE_S})\n"


def _spin_until(stop: threading.Event) -> None:
    while not stop.is_set():
        _burn(BUSY_SLICE_S)


class PBusyLoad:
    """P's stand-in engine: a pure-Python spin in a thread of P's process (it contends for P's GIL) or the
    same spin in a separate process (the same CPU load, no GIL); D switches it between its cases."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def set(self, mode: str) -> None:
        """Stop the current load and start `mode` (idle, thread or process); returns once it runs."""
        if mode not in BUSY_MODES:
            raise ValueError(f"busy mode {mode!r} is none of {', '.join(BUSY_MODES)}")
        self.stop()
        if mode == "thread":
            self._stop.clear()
            self._thread = threading.Thread(target=_spin_until, args=(self._stop,), name="p2pkv-bench-busy",
                                            daemon=True)
            self._thread.start()
        elif mode == "process":
            self._proc = subprocess.Popen([sys.executable, "-c", _spin_program()], stdout=subprocess.PIPE, text=True)
            if self._proc.stdout.readline().strip() != "spinning":
                self.stop()
                raise OSError("the busy-load process did not start")

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> "PBusyLoad":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ask_p_over_stdio(mode: str) -> None:
    """D as P's child: ask for a busy mode on stdout, return once P answers on stdin that it runs."""
    print(BUSY_TAG + mode, flush=True)
    answer = sys.stdin.readline().strip()
    if answer != f"ok {mode}":
        raise ConnectionError(f"P did not confirm busy mode {mode!r} (it answered {answer!r})")


class StoreBusyChannel:
    """Busy-mode requests from D (rank 1) to P (rank 0) through torchrun's store, numbered so none is missed."""

    def __init__(self, store: Any, prefix: str, timeout: float):
        self._store, self._prefix = store, prefix + "/busy"
        self._timeout = datetime.timedelta(seconds=timeout)
        self._n = 0

    def ask(self, mode: str) -> None:
        """D: ask for `mode` and return once P runs it."""
        self._n += 1
        self._store.set(f"{self._prefix}/{self._n}", mode)
        self._store.wait([f"{self._prefix}/{self._n}/ack"], self._timeout)

    def end(self) -> None:
        """D: no more requests (sent also when D fails, so that P stops waiting for them)."""
        self._n += 1
        self._store.set(f"{self._prefix}/{self._n}", "end")

    def serve(self, load: PBusyLoad) -> None:
        """P: apply D's requests to `load` until D ends them."""
        while True:
            self._n += 1
            key = f"{self._prefix}/{self._n}"
            self._store.wait([key], self._timeout)
            mode = self._store.get(key).decode()
            if mode == "end":
                return
            load.set(mode)
            self._store.set(key + "/ack", "ok")


_SLICES: list[float] = []  # how long each engine-loop slice really took (they overrun 1 ms a little)


def _engine_loop_read(tr: Transport, peer: Peer, segs: Segments, request_id: str, timeout: float) -> float:
    """D's thread as an engine's: post, then 1 ms of pure Python and one done() poll, again and again;
    seconds from posting to the first poll that sees the read done."""
    t0 = time.perf_counter()
    handle = tr.read(peer, segs, request_id=request_id)
    while True:
        ts = time.perf_counter()
        _burn(BUSY_SLICE_S)
        _SLICES.append(time.perf_counter() - ts)
        if handle.done():
            dt = time.perf_counter() - t0
            handle.wait(0)
            return dt
        if time.perf_counter() - t0 > timeout:
            raise TransferTimeout(f"not done after {timeout:g} s of engine-loop polls", peer=handle.peer,
                                  request_id=request_id)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _BusyCases:
    """D's --busy cases for one --tokens value: the idle run's plan again with P's engine busy (a thread in
    its process, then the same spin in another process) and with D's engine loop; each case starts from D's
    initial cache and is verified on its own."""

    def __init__(self, tr: Transport, peer: Peer, args: argparse.Namespace, backend: str, tokens: int,
                 plan: list[list[_Request]], tensors: list[torch.Tensor], ask_p: Callable[[str], None]):
        self.tr, self.peer, self.args, self.backend, self.tokens = tr, peer, args, backend, tokens
        self.plan, self.tensors, self.ask_p = plan, tensors, ask_p
        self.verified = True

    def measure(self, idle_p50_ms: float) -> dict[str, Any]:
        """Verify the idle run, run every busy case, and return the row's busy fields."""
        self._verify_and_reset("idle")
        thread = self._with_p_busy("thread", "p_busy_thread")
        proc = self._with_p_busy("process", "p_busy_proc")
        _SLICES.clear()
        engine = self._run("d_engine", _engine_loop_read)
        slice_ms = round(float(np.median(_SLICES)) * 1e3, 4) if _SLICES else BUSY_SLICE_S * 1e3
        return {"idle_p50_ms": idle_p50_ms, "p_busy_thread_p50_ms": _ms(thread), "p_busy_proc_p50_ms": _ms(proc),
                "p_busy_ratio": round(_ms(thread) / _ms(proc), 3), "d_engine_p50_ms": _ms(engine),
                "d_engine_ratio": round(_ms(engine) / idle_p50_ms, 3),
                "d_engine_target_ms": round(1.1 * idle_p50_ms + slice_ms, 4), "busy_slice_ms": slice_ms,
                "verified": self.verified}

    def _with_p_busy(self, mode: str, case: str) -> list[float]:
        self.ask_p(mode)
        try:
            return self._run(case, _timed_read)
        finally:
            self.ask_p("idle")

    def _run(self, case: str, read: Callable[..., float]) -> list[float]:
        lat = []
        for it, reqs in enumerate(self.plan):
            for r, req in enumerate(reqs):
                dt = read(self.tr, self.peer, req.segs, f"bench-{case}-{self.tokens}-{it}-{r}", self.args.timeout)
                if it >= self.args.warmup:
                    lat.append(dt)
        self._verify_and_reset(case)
        _progress(f"[p2pkv bench] {self.backend} {self.tokens} tokens: {case} p50 {_ms(lat):.3f} ms")
        return lat

    def _verify_and_reset(self, case: str) -> None:
        """Check every byte of D's cache after `case`, then restore D's initial bytes for the next case."""
        _sync(str(self.tensors[0].device))
        if not _verify(self.args, self.tensors, _last_writers(self.plan)):
            self.verified = False
            _progress(f"[p2pkv bench] {self.backend} {self.tokens} tokens: {case}: D's cache does not match")
        for i, t in enumerate(self.tensors):
            _fill(t.view(torch.uint8).view(-1), D_SEED + self.args.seed + i)
        _sync(str(self.tensors[0].device))


# --------------------------------------------------------------------------------------------- D and P

def run_d(args: argparse.Namespace, backend: str, p_address: str,
          ask_p: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """D's side: read random P blocks into random D blocks, time it, verify, return result rows.

    With `ask_p` (--busy) the same reads are measured again with P or D busy, each case verified on its own."""
    device = _device(args)
    rss_base = _rss_mib()
    tensors, spec = _build(args, device, D_SEED + args.seed)
    tr: Transport = get_transport(backend, **_options(args, backend))
    rows = []
    try:
        tr.register(tensors, spec)
        peer = tr.connect(p_address)
        rng = np.random.default_rng(args.seed)
        peak = _PeakRss()
        last_src: dict[int, int] = {}
        for tokens in args.tokens:
            plan = _plan(args, rng, peer.spec, spec, tokens)
            lat, base = _run_idle(tr, peer, args, backend, tokens, plan, peak)
            row = _row(args, backend, tokens, plan[-1][-1].segs, lat, base)
            if ask_p is None:
                last_src.update(_last_writers(plan))
            else:
                busy = _BusyCases(tr, peer, args, backend, tokens, plan, tensors, ask_p)
                row.update(busy.measure(idle_p50_ms=row["p50_ms"]))
            rows.append(row)
        if ask_p is None:
            _sync(device)
            ok = _verify(args, tensors, last_src)
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
    device = _device(args)
    tr: Transport = get_transport(backend, **_options(args, backend))
    try:
        tensors, spec = _build(args, device, P_SEED + args.seed)
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


def _local_pair(args: argparse.Namespace, backend: str) -> list[dict[str, Any]]:
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
            raise SystemExit(f"the D process failed (exit {proc.returncode}); see its messages above")
        if rows is None:
            raise SystemExit("the D process ended without results")
        return rows
    try:
        return run_p(args, backend, publish, collect)
    finally:
        for c in child:
            if c.poll() is None:
                c.kill()
                c.wait()


def _torchrun_pair(args: argparse.Namespace, backend: str) -> list[dict[str, Any]] | None:
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


# --------------------------------------------------------------------------------------------- output

COLUMNS = [("backend", "backend", "{}"), ("device", "dev", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"),
           ("tokens", "tokens", "{}"), ("segments", "segs", "{}"), ("bytes", "MiB/req", None), ("gbps", "GB/s", "{:.2f}"),
           ("baseline_gbps", "base GB/s", "{:.2f}"), ("ratio", "ratio", "{:.3f}"), ("p50_ms", "p50 ms", "{:.3f}"),
           ("p99_ms", "p99 ms", "{:.3f}"), ("verified", "verified", "{}")]

BUSY_COLUMNS = [("backend", "backend", "{}"), ("device", "dev", "{}"), ("tokens", "tokens", "{}"),
                ("idle_p50_ms", "idle ms", "{:.3f}"), ("p_busy_thread_p50_ms", "P thread ms", "{:.3f}"),
                ("p_busy_proc_p50_ms", "P proc ms", "{:.3f}"), ("p_busy_ratio", "P ratio", "{:.2f}"),
                ("d_engine_p50_ms", "D loop ms", "{:.3f}"), ("d_engine_ratio", "D ratio", "{:.2f}"),
                ("busy_slice_ms", "slice ms", "{:.3f}"), ("d_engine_target_ms", "D target ms", "{:.3f}"),
                ("verified", "verified", "{}")]

BUSY_LEGEND = f"""\
idle ms      p50 per request with nothing else running (the p50 above)
P thread ms  p50 with a pure-Python thread spinning inside P's process (it holds P's GIL)
P proc ms    p50 with the same spin in a separate process (the same CPU load, no GIL contention)
P ratio      P thread / P proc: what a busy engine thread in P costs D's reads (target <= 1.1)
D loop ms    p50 with D's posting thread as an engine's: {BUSY_SLICE_S * 1e3:g} ms of pure Python, then one done()
             poll, repeated; a request's time is the first poll that sees it done
D ratio      D loop / idle
slice ms     the median length of D's work slices in that loop, as measured
D target ms  1.1 x idle + one {BUSY_SLICE_S * 1e3:g} ms slice (its median length as measured): D loop should be at most this
verified     D's whole cache checked after each case (idle and the three busy ones), and reset between them"""


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str | None]] = COLUMNS) -> str:
    """A text table of result rows, one line each, in `columns` (key, heading, format)."""
    head = [c[1] for c in columns]
    body = [[f"{r['bytes'] / 2**20:.1f}" if key == "bytes" else fmt.format(r.get(key, "")) for key, _, fmt in columns]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def format_busy_table(rows: list[dict[str, Any]]) -> str:
    """The --busy figures of each row against its idle run, followed by a legend of the columns."""
    return format_table(rows, BUSY_COLUMNS) + "\n\n" + BUSY_LEGEND


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'p2pkv[plot]'", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in rows}):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in rs], [r["gbps"] for r in rs], "o-", label=f"p2pkv {backend}")
        ax.plot([r["tokens"] for r in rs], [r["baseline_gbps"] for r in rs], "x--", label=f"raw baseline {backend}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per request")
    ax.set_ylabel("GB/s (payload)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    dtype_from_name(args.dtype)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends:
        raise ValueError(f"--backend names no transport; choose from {', '.join(available_transports())}")
    for backend in backends:
        _options(args, backend)
    if args.role == "d":
        rows = run_d(args, backends[0], args.connect, _ask_p_over_stdio if args.busy else None)
        print(RESULT_TAG + json.dumps(rows), flush=True)
        return 0
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if int(os.environ.get("RANK", "0")) == 0:
        _check_output("--json", args.json)
        _check_output("--plot", args.plot)
    _check_memory(args, local_pair=not under_torchrun)
    if "nccl" in backends and args.device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() < 2:
        raise SystemExit("--backend nccl --device cuda needs two GPUs, one per rank (NCCL refuses two ranks on one "
                         "GPU); this machine has one. Use --device cpu (gloo), or --backend cuda_ipc for two "
                         "processes on one GPU.")
    rows: list[dict[str, Any]] = []
    for backend in backends:
        got = _torchrun_pair(args, backend) if under_torchrun else _local_pair(args, backend)
        if got is None:
            return 0
        rows += got
    print(format_table(rows))
    if args.busy:
        print("\nbusy engines (same requests, same run):\n" + format_busy_table(rows))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("role", "connect")}
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2)
    if args.plot:
        _plot(rows, args.plot)
    return 0 if all(r["verified"] for r in rows) else 1
