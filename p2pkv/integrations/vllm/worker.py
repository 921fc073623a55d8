"""The worker half of P2pKvConnector: one per engine worker process. It owns the
`p2pkv.connector.KVConnector` (and so the transport), posts the specs the scheduler half
sent, and polls them in vLLM's own per-step calls; it also times loads and holds and
turns the connector's counters into `P2pKvStats` for vLLM's metrics."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from p2pkv.connector import ConnectorStats, KVConnector
from p2pkv.integrations.vllm.metrics import P2pKvStats
from p2pkv.integrations.vllm.settings import Settings
from p2pkv.integrations.vllm.specs import P2pKvHandshake, P2pKvMetadata, SaveSpec
from p2pkv.layout import KVCacheSpec

__all__ = ["P2pKvWorker", "block_dim"]

log = logging.getLogger("p2pkv.vllm")


def block_dim(t: torch.Tensor, num_blocks: int) -> int | None:
    """The dim of a vLLM KV tensor that indexes blocks: of the dims of size
    `num_blocks`, the one with the largest stride (blocks are outermost within a
    layer in every vLLM layout; a head or token dim of the same size is inside)."""
    cands = [d for d in range(t.dim()) if t.shape[d] == num_blocks]
    return max(cands, key=lambda d: t.stride(d)) if cands else None


class P2pKvWorker:
    """Posts saves, loads and discards, reports what finished, and counts what moved."""

    def __init__(self, settings: Settings, block_size: int, num_blocks: int):
        self.settings, self.block_size, self.num_blocks = settings, block_size, num_blocks
        self.conn: KVConnector | None = None
        self._key_to_req: dict[str, str] = {}
        self._invalid: set[int] = set()
        self._layer_index: dict[str, int] = {}
        self._dropped: set[str] = set()
        self._load_started: dict[str, float] = {}
        self._hold_started: dict[str, float] = {}
        self._reported = {"reported_finished_sending": 0, "reported_finished_recving": 0}
        self._stats = P2pKvStats()
        self._seen = ConnectorStats()
        self._worker = str(os.getpid())
        self._held_told: int | None = None
        self._written: dict[str, Any] = {}

    # ---------------------------------------------------------------- start-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register the engine's own tensors (as they are) with the transport."""
        s = self.settings
        names = list(kv_caches)
        tensors = [kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        spec = KVCacheSpec.from_tensors(tensors, num_blocks=self.num_blocks,
                                        block_dim=block_dim(tensors[0], self.num_blocks),
                                        block_size=self.block_size, num_layers=len(tensors), layout="vllm-engine")
        opts = dict(s.transport_options)
        if s.backend != "loopback":
            opts.setdefault("listen", s.listen)
        if s.auth_token:
            opts["auth_token"] = s.auth_token
        self.conn = KVConnector(s.backend, mode=s.mode, hold_timeout=s.hold_timeout, load_timeout=s.load_timeout,
                                checksum=s.checksum, layerwise=False, **opts)
        self.conn.register_kv_caches(tensors, spec)
        log.info("P2pKvConnector worker: %d KV tensors (%d blocks, %d bytes/block) registered on %s (%s, %s mode)",
                 len(tensors), spec.num_blocks, spec.bytes_per_block, self.conn.address, s.backend, s.mode)

    def handshake(self) -> P2pKvHandshake | None:
        if self.conn is None:
            return None
        return P2pKvHandshake(self.settings.advertise or self.conn.address)

    # ---------------------------------------------------------------- each step
    def _hold(self, s: SaveSpec, now: float) -> None:
        self._key_to_req[s.key] = s.req
        self._hold_started.setdefault(s.key, now)

    def drive(self, meta: Any) -> None:
        """Post what the scheduler half asked for in this step (each spec once)."""
        if not isinstance(meta, P2pKvMetadata) or self.conn is None:
            return
        now = time.monotonic()
        for s in meta.saves:
            self._hold(s, now)
            try:
                self.conn.save(s.key, s.blocks)
            except ValueError as e:  # preempted after its layers went out: hold the blocks it ended in
                log.warning("request %s: %s; holding its final blocks instead", s.req, e)
                self.conn.release(s.key)
                self.conn.save(s.key, s.blocks)
        for key in meta.drops:
            self._key_to_req.pop(key, None)
            self._hold_started.pop(key, None)
            self._dropped.add(key)
            self.conn.release(key)
        for ld in meta.loads:
            self._load_started[ld.req] = now
            self.conn.load(ld.req, ld.blocks, peer=ld.peer, remote_request_id=ld.key,
                           remote_block_ids=ld.remote_blocks, remote_offset=ld.offset)
        for d in meta.discards:
            self.conn.discard(d.peer, d.key)
        meta.saves, meta.loads, meta.discards, meta.drops = [], [], [], []

    def save_layer(self, meta: Any, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Push mode: hand one computed layer of the prefills completing in this step to the
        connector, so it travels while the next layers compute."""
        if not isinstance(meta, P2pKvMetadata) or not meta.layer_saves or self.conn is None:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        ready = None
        if kv_layer.is_cuda:
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
        now = time.monotonic()
        for s in meta.layer_saves:
            self._hold(s, now)
            self.conn.save(s.key, s.blocks, layer=layer, ready=ready, final=False)

    def transfer_results(self) -> KVConnectorTransferResults:
        """What ended since the last step; also what moves this worker's transfers along."""
        out = KVConnectorTransferResults()
        if self.conn is None:
            return out
        f = self.conn.get_finished()
        now = time.monotonic()
        for key in f.saved:
            started = self._hold_started.pop(key, None)
            if started is not None:
                self._stats.observe_hold(now - started)
            if key in self._dropped:  # vLLM freed those blocks itself when the request was aborted
                self._dropped.discard(key)
                continue
            out.finished_sending.add(self._key_to_req.pop(key, key))
        out.finished_recving |= f.loaded
        for req in f.loaded:
            started = self._load_started.pop(req, None)
            if started is not None and req not in f.failed:
                self._stats.observe_load(now - started)
        for failure in f.failed.values():
            self._invalid.update(failure.blocks)
        self._reported["reported_finished_sending"] += len(out.finished_sending)
        self._reported["reported_finished_recving"] += len(out.finished_recving)
        if self.settings.metrics_path:
            self._write_json(self.settings.metrics_path)
        return out

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def take_stats(self) -> P2pKvStats | None:
        """What moved since vLLM last asked (None if nothing did), for vLLM's stats and /metrics."""
        if self.conn is None:
            return None
        now = self.conn.stats()
        delta, self._seen = now.since(self._seen), now
        held_changed = now.held != self._held_told
        self._stats.add(delta, self._worker if held_changed else None)
        self._held_told = now.held
        if self._stats.is_empty():
            return None
        return self._stats.clone_and_reset()

    def _write_json(self, path: str) -> None:
        """The connector's cumulative counters as a JSON file, rewritten when they change."""
        assert self.conn is not None
        snap = {**self.conn.stats().to_dict(), **self._reported}
        if snap == self._written:
            return
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".")
        with os.fdopen(fd, "w") as fh:
            json.dump(snap, fh)
        os.replace(tmp, path)
        self._written = snap

    def shutdown(self) -> None:
        if self.conn is not None:
            if self.settings.metrics_path:
                self._write_json(self.settings.metrics_path)
            self.conn.close()
            self.conn = None
