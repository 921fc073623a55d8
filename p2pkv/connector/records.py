"""Plain records of the connector: what a load's failure and a round of finished
work look like to the engine, and the per-request state each side keeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from p2pkv.connector.links import Link
from p2pkv.connector.messages import Want
from p2pkv.transport import TransferHandle

__all__ = ["LoadFailure", "Finished", "Hold", "Load"]


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
    writes: list[TransferHandle] = field(default_factory=list)
    link: Link | None = None
    want: Want | None = None
    ready: dict[int, Callable[[], None]] = field(default_factory=dict)
    final: bool = False
    pending_end: str | None = None
    stop: str | None = None  # how it ends once no write is in flight: D gave up, the engine released it, a write failed

    @property
    def inflight(self) -> int:
        return len(self.writes)


@dataclass
class Load:
    """Consumer side: one request's blocks being filled from a peer."""

    key: str
    blocks: np.ndarray
    link: Link
    remote_key: str
    remote_blocks: np.ndarray | None
    remote_offset: int
    deadline: float
    reads: list[tuple[list[int], TransferHandle]] | None = None  # None until posted; then the ones still running
    handles: dict[int, TransferHandle] = field(default_factory=dict)
    done: dict[int, bool] = field(default_factory=dict)
    bad: set[int] = field(default_factory=set)
    awaiting_answer: bool = False
    error: str | None = None
    sent: int | None = None
    closed_only: bool = True  # every failed read found the connection closed (so a fresh dial may do)
    retried: bool = False

    @property
    def peer_address(self) -> str:
        return self.link.address
