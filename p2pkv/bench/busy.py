"""--busy: the idle run's requests again with P's engine thread busy in pure Python (against the same spin in
another process) and with D's thread as an engine loop, each case verified on its own (docs/architecture.md,
"Threads: who moves the bytes"). P's load is switched by D, over stdin/stdout (local pair) or torchrun's store."""
from __future__ import annotations

import argparse
import datetime
import inspect
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.bench.cache import D_SEED, fill, verify
from p2pkv.bench.progress import progress
from p2pkv.bench.requests import Request, last_writers, ms, timed_read
from p2pkv.segments import Segments
from p2pkv.transport import Peer, TransferTimeout, Transport

__all__ = ["BUSY_SLICE_S", "BUSY_TAG", "BUSY_MODES", "PBusyLoad", "ask_p_over_stdio", "StoreBusyChannel",
           "BusyCases", "engine_loop_read"]

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


def ask_p_over_stdio(mode: str) -> None:
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


def engine_loop_read(tr: Transport, peer: Peer, segs: Segments, request_id: str, timeout: float) -> float:
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


class BusyCases:
    """D's --busy cases for one --tokens value: the idle run's plan again with P's engine busy (a thread in
    its process, then the same spin in another process) and with D's engine loop; each case starts from D's
    initial cache and is verified on its own."""

    def __init__(self, tr: Transport, peer: Peer, args: argparse.Namespace, backend: str, tokens: int,
                 requests: list[list[Request]], tensors: list[torch.Tensor], ask_p: Callable[[str], None]):
        self.tr, self.peer, self.args, self.backend, self.tokens = tr, peer, args, backend, tokens
        self.requests, self.tensors, self.ask_p = requests, tensors, ask_p
        self.verified = True

    def measure(self, idle_p50_ms: float) -> dict[str, Any]:
        """Verify the idle run, run every busy case, and return the row's busy fields."""
        self._verify_and_reset("idle")
        thread = self._with_p_busy("thread", "p_busy_thread")
        proc = self._with_p_busy("process", "p_busy_proc")
        _SLICES.clear()
        engine = self._run("d_engine", engine_loop_read)
        slice_ms = round(float(np.median(_SLICES)) * 1e3, 4) if _SLICES else BUSY_SLICE_S * 1e3
        return {"idle_p50_ms": idle_p50_ms, "p_busy_thread_p50_ms": ms(thread), "p_busy_proc_p50_ms": ms(proc),
                "p_busy_ratio": round(ms(thread) / ms(proc), 3), "d_engine_p50_ms": ms(engine),
                "d_engine_ratio": round(ms(engine) / idle_p50_ms, 3),
                "d_engine_target_ms": round(1.1 * idle_p50_ms + slice_ms, 4), "busy_slice_ms": slice_ms,
                "verified": self.verified}

    def _with_p_busy(self, mode: str, case: str) -> list[float]:
        self.ask_p(mode)
        try:
            return self._run(case, timed_read)
        finally:
            self.ask_p("idle")

    def _run(self, case: str, read: Callable[..., float]) -> list[float]:
        lat = []
        for it, reqs in enumerate(self.requests):
            for r, req in enumerate(reqs):
                dt = read(self.tr, self.peer, req.segs, f"bench-{case}-{self.tokens}-{it}-{r}", self.args.timeout)
                if it >= self.args.warmup:
                    lat.append(dt)
        self._verify_and_reset(case)
        progress(f"{self.backend} {self.tokens} tokens: {case} p50 {ms(lat):.3f} ms")
        return lat

    def _verify_and_reset(self, case: str) -> None:
        """Check every byte of D's cache after `case`, then restore D's initial bytes for the next case."""
        _sync(str(self.tensors[0].device))
        if not verify(self.args, self.tensors, last_writers(self.requests)):
            self.verified = False
            progress(f"{self.backend} {self.tokens} tokens: {case}: D's cache does not match")
        for i, t in enumerate(self.tensors):
            fill(t.view(torch.uint8).view(-1), D_SEED + self.args.seed + i)
        _sync(str(self.tensors[0].device))
