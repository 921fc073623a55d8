"""Helpers for multi-process tests: start a P peer process, talk to it, always end it; run code in a child
pinned to one CPU, as an engine pins its compute thread."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from p2pkv.bench.stop import stop_process as _stop_process

HERE = Path(__file__).resolve().parent


class PeerProc:
    def __init__(self, proc: subprocess.Popen, addresses: list[str]):
        self.proc, self.addresses = proc, addresses

    def command(self, line: str, expect: str) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        got = self.proc.stdout.readline().strip()
        assert got == expect, f"peer answered {got!r} to {line!r}"

    def dump(self, i: int, path: Path) -> bytes:
        self.command(f"dump {i} {path}", "DUMPED")
        return path.read_bytes()


@contextmanager
def peer_process(backend: str, configs: list[dict], options: dict | None = None,
                 env: dict | None = None) -> Iterator[PeerProc]:
    """Run tests/peer.py as P; yields its listening addresses; kills it on exit."""
    proc = subprocess.Popen([sys.executable, str(HERE / "peer.py"), backend, json.dumps(configs),
                             json.dumps(options or {})], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        addrs = []
        for _ in configs:
            line = proc.stdout.readline().strip()  # type: ignore[union-attr]
            if not line.startswith("ADDR "):
                raise RuntimeError(f"peer process failed to start: {line!r}")
            addrs.append(line[5:])
        yield PeerProc(proc, addrs)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_errors(handles, timeout: float = 10.0) -> list:
    """Wait for every handle; return the TransferErrors they ended with, in order."""
    from p2pkv.transport import TransferError
    errors = []
    for h in handles:
        try:
            h.wait(timeout)
        except TransferError as e:
            errors.append(e)
    return errors


def run_pinned(code: str, io_cpus: str | None = None, timeout: float = 60) -> Any:
    """Run `code` in a child Python that first pins itself to one CPU (the lowest this process may use), as an
    engine pins its compute thread, so every thread it starts inherits that CPU; P2PKV_IO_CPUS is `io_cpus`
    (unset for None). Returns the Python literal the child printed last."""
    cpu = min(os.sched_getaffinity(0))
    prelude = f"import os, sys\nsys.path[:0] = {[str(HERE.parent), str(HERE)]!r}\nos.sched_setaffinity(0, {{{cpu}}})\n"
    env = {k: v for k, v in os.environ.items() if k != "P2PKV_IO_CPUS"}
    if io_cpus is not None:
        env["P2PKV_IO_CPUS"] = io_cpus
    out = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def stop_process(pid: int, timeout: float = 10.0) -> float:
    """SIGSTOP `pid` and return once every thread of it is stopped (seconds it took); a test failure
    if that takes longer than `timeout` (p2pkv.bench.stop.stop_process)."""
    try:
        return _stop_process(pid, timeout)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None
