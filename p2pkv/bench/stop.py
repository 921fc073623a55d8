"""Freeze a process for a stalled-peer measurement: SIGSTOP, then wait until every thread is stopped."""
from __future__ import annotations

import os
import signal
import time

__all__ = ["stop_process"]


def stop_process(pid: int, timeout: float = 10.0) -> float:
    """SIGSTOP `pid` and return once every thread of it is stopped (seconds it took), else TimeoutError:
    kill() only queues the signal, and on a loaded host a thread ran on (and served a request) after it
    returned."""
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass
        if states and all(st in "Tt" for st in states):
            return time.monotonic() - t0
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} not stopped {timeout} s after SIGSTOP")
