"""Plain records of the connector: what a load's failure and a round of finished
work look like to the engine, the per-request state each side keeps, and the
snapshot of its counters that engines' metrics read (`ConnectorStats`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from p2pkv.connector.links import Link
from p2pkv.connector.messages import Want
from p2pkv.transport import TransferHandle

__all__ = ["LoadFailure", "Finished", "Hold", "Load", "ShardedLoad", "ConnectorStats", "FAILURE_CAUSES", "HOLD_ENDS"]


@dataclass(frozen=True)
class LoadFailure:
    """A load that ended without every block: `blocks` are the local block ids to recompute."""

    blocks: tuple[int, ...]
    reason: str
    cause: str = "transfer_error"  # one of FAILURE_CAUSES, for metrics


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
    sent_blocks: int = 0  # push: how many of `blocks` were written to D
    stop: str | None = None  # how it ends once no write is in flight: D gave up, the engine released it, a write failed
    releases: int = 0  # pull: releases counted so far, of a hold several D ranks read

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
    cause: str | None = None  # FAILURE_CAUSES entry for `error`
    sent: int | None = None
    closed_only: bool = True  # every failed read found the connection closed (so a fresh dial may do)
    retried: bool = False
    not_held_yet: bool = False  # a held read found P not holding the request yet: posted again
    parent: str | None = None  # the ShardedLoad this is one P rank's part of
    release_of: int = 1  # pull: how many D ranks release this P rank's hold (tensor parallelism)

    @property
    def peer_address(self) -> str:
        return self.link.address


@dataclass
class ShardedLoad:
    """Consumer side: one request read from several P ranks of a tensor-parallel group, as one
    `Load` per P rank (`parts`); it ends when every part did, failed if any part failed."""

    key: str
    blocks: np.ndarray
    parts: list[str]
    ended: dict[str, LoadFailure | None] = field(default_factory=dict)


FAILURE_CAUSES = ("unreachable", "gone", "timeout", "producer_abort", "transfer_error", "checksum", "partial",
                  "bad_plan")
"""Why a load failed: the producer could not be reached; it no longer held the request; the
load timed out; the producer gave up pushing; a read or write failed; a block's checksum
differed; the producer sent fewer blocks than asked; the two layouts could not be planned."""

HOLD_ENDS = {"released_confirmed": "confirmed", "released_timeout": "expired", "released_aborted": "aborted",
             "released_error": "error"}
"""The connector's counter of each way a hold ends → the outcome it reports."""


@dataclass(frozen=True)
class ConnectorStats:
    """The connector's cumulative counters and how many holds it keeps now.

    `counts`: requests, blocks and bytes loaded (D) and sent (P: written in push, or read
    by D and confirmed in pull), failed blocks, retries, checksum mismatches, holds
    started, layers pushed. `load_failures`: by cause (FAILURE_CAUSES). `holds_ended`: by
    outcome (confirmed, expired, aborted, error). `held`: holds kept now."""

    counts: dict[str, int] = field(default_factory=dict)
    load_failures: dict[str, int] = field(default_factory=dict)
    holds_ended: dict[str, int] = field(default_factory=dict)
    held: int = 0

    @classmethod
    def from_counter(cls, metrics: Mapping[str, int], held: int) -> "ConnectorStats":
        counts, failures, ends = {}, {}, {}
        for k, v in metrics.items():
            if k in HOLD_ENDS:
                ends[HOLD_ENDS[k]] = v
            elif k.startswith("load_failed_"):
                failures[k[len("load_failed_"):]] = v
            elif k != "load_failures":
                counts[k] = v
        return cls(counts, failures, ends, held)

    def since(self, earlier: "ConnectorStats") -> "ConnectorStats":
        """What changed after `earlier` (counters' differences; `held` as now)."""
        def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: v - b.get(k, 0) for k, v in a.items() if v != b.get(k, 0)}
        return ConnectorStats(diff(self.counts, earlier.counts), diff(self.load_failures, earlier.load_failures),
                              diff(self.holds_ended, earlier.holds_ended), self.held)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: the counts at top level, then the three named parts."""
        return {**self.counts, "load_failures": dict(self.load_failures), "holds_ended": dict(self.holds_ended),
                "held": self.held}
