"""Plain records of the connector: what a load's failure and a round of finished
work look like to the engine, and the per-request state each side keeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pkv.transport import Peer

__all__ = ["LoadFailure", "Finished", "Hold", "Load", "message"]


@dataclass(frozen=True)
class LoadFailure:
    """A load that ended without every block: `blocks` are the local block ids to recompute."""

    blocks: tuple[int, ...]
    reason: str


@dataclass
class Finished:
    """What ended since the last `get_finished()`: holds released (producer), loads
    finished (consumer, failed ones included) and, for the failed ones, why."""

    saved: set[str] = field(default_factory=set)
    loaded: set[str] = field(default_factory=set)
    failed: dict[str, LoadFailure] = field(default_factory=dict)


@dataclass
class Hold:
    """Producer side: blocks of one request kept until D has them."""

    key: str
    blocks: np.ndarray
    saved: set[int]
    deadline: float
    written: set[int] = field(default_factory=set)
    inflight: int = 0
    peer: Peer | None = None
    want: tuple[np.ndarray, str] | None = None
    offset: int = 0
    ready: dict[int, Any] = field(default_factory=dict)
    final: bool = False
    pending_end: str | None = None
    stop: str | None = None  # how it ends once no write is in flight: D gave up, the engine released it, a write failed


@dataclass
class Load:
    """Consumer side: one request's blocks being filled from a peer."""

    key: str
    blocks: np.ndarray
    peer_address: str
    remote_key: str
    remote_blocks: np.ndarray | None
    remote_offset: int
    deadline: float
    done: dict[int, bool] = field(default_factory=dict)
    bad: set[int] = field(default_factory=set)
    started: bool = False
    awaiting_answer: bool = False
    reads_pending: int = 0
    peer: Peer | None = None
    error: str | None = None
    sent: int | None = None


def message(kind: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"p2pkv": kind, "req": key, **fields}


