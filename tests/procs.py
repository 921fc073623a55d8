"""Helpers for multi-process tests: start a P peer process, talk to it, always end it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
