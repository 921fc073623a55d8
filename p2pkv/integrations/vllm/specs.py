"""What the scheduler half hands the worker half each step (`P2pKvMetadata`, made of
typed save/load/discard specs) and what a worker reports at start-up (its address)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata, KVConnectorMetadata

__all__ = ["SaveSpec", "LoadSpec", "DiscardSpec", "P2pKvMetadata", "P2pKvHandshake"]


@dataclass(frozen=True)
class SaveSpec:
    """P: hold (pull) or push request `req`'s `blocks`, known to D as `key`."""

    req: str
    key: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class LoadSpec:
    """D: fill local `blocks` of `req` from the producer at `peers` (its TP ranks' addresses in
    rank order; one without TP), which knows it as `key`.

    Pull: `remote_blocks` are P's blocks, in the same order. Push: None; P writes its
    blocks `[offset:]` (D's prefix cache already holds the first `offset`)."""

    req: str
    key: str
    peers: tuple[str, ...]
    blocks: tuple[int, ...]
    remote_blocks: tuple[int, ...] | None
    offset: int = 0


@dataclass(frozen=True)
class DiscardSpec:
    """D: tell the producer at `peers` (its TP ranks) it can free `key` now (D will not load it)."""

    peers: tuple[str, ...]
    key: str


@dataclass
class P2pKvMetadata(KVConnectorMetadata):
    """Scheduler → worker, once per step. `layer_saves`: push, prefills that complete in
    this step (P sends each layer once computed). `drops`: keys P no longer holds for
    (the request was aborted)."""

    saves: list[SaveSpec] = field(default_factory=list)
    layer_saves: list[SaveSpec] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    discards: list[DiscardSpec] = field(default_factory=list)


@dataclass
class P2pKvHandshake(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up: where the worker's transport listens (one per TP rank)."""

    address: str
