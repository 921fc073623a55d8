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
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from p2pkv.connector import ConnectorStats, KVConnector
from p2pkv.integrations.vllm.metrics import P2pKvStats
from p2pkv.integrations.vllm.settings import Settings
from p2pkv.integrations.vllm.specs import P2pKvHandshake, P2pKvMetadata, SaveSpec
from p2pkv.heads import heads_of
from p2pkv.layout import KVCacheSpec

__all__ = ["P2pKvWorker", "Shard", "block_dim"]

log = logging.getLogger("p2pkv.vllm")


def block_dim(t: torch.Tensor, num_blocks: int) -> int | None:
    """The dim of a vLLM KV tensor that indexes blocks: of the dims of size
    `num_blocks`, the one with the largest stride (blocks are outermost within a
    layer in every vLLM layout; a head or token dim of the same size is inside)."""
    cands = [d for d in range(t.dim()) if t.shape[d] == num_blocks]
    return max(cands, key=lambda d: t.stride(d)) if cands else None


@dataclass(frozen=True)
class Shard:
    """What the worker's KV tensors hold of the model: `num_kv_heads` (the model's; 0 for MLA's
    latent), `head_size`, and how many TP ranks share them (this worker's rank is vLLM's)."""

    num_kv_heads: int = 0
    head_size: int = 0
    tp_size: int = 1


def dim_names(shape: tuple[int, ...], num_blocks: int, block_size: int, heads: int,
              head_size: int) -> tuple[str, ...] | None:
    """Names for the dims of a vLLM KV tensor of `shape`, from the logical shapes vLLM's attention
    backends use (strides may order them otherwise in memory), or None if none fits."""
    n, b, h, d = num_blocks, block_size, heads, head_size
    for names, sizes in ((("kv", "block", "token", "head", "dim"), (2, n, b, h, d)),
                         (("block", "kv", "token", "head", "dim"), (n, 2, b, h, d)),
                         (("block", "head", "token", "kvdim"), (n, h, b, 2 * d)),
                         (("block", "token", "dim"), (n, b, d))):
        if shape == sizes and (h or "head" not in names):
            return names
    return None


def rank_address(address: str, rank: int) -> str:
    """TP rank `rank`'s address from the instance's `host:port`: port + rank (port 0 stays 0)."""
    host, _, port = address.rpartition(":")
    return address if port in ("", "0") or not rank else f"{host}:{int(port) + rank}"


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
    return get_tensor_model_parallel_rank()


class P2pKvWorker:
    """Posts saves, loads and discards, reports what finished, and counts what moved."""

    def __init__(self, settings: Settings, block_size: int, num_blocks: int, shard: Shard = Shard()):
        self.settings, self.block_size, self.num_blocks, self.shard = settings, block_size, num_blocks, shard
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
        self.tp_rank = 0

    # ---------------------------------------------------------------- start-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register the engine's own tensors (as they are, this TP rank's shard) with the transport."""
        s, shard = self.settings, self.shard
        names = list(kv_caches)
        tensors = [kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        self.tp_rank = _tp_rank() if shard.tp_size > 1 else 0
        local_heads = len(heads_of(shard.num_kv_heads, shard.tp_size, self.tp_rank)) if shard.num_kv_heads else 0
        bdim = block_dim(tensors[0], self.num_blocks)
        dims = dim_names(tuple(tensors[0].shape), self.num_blocks, self.block_size, local_heads, shard.head_size)
        if dims is None and shard.tp_size > 1:
            raise ValueError(f"P2pKvConnector: cannot tell the head dim of KV tensors of shape "
                             f"{tuple(tensors[0].shape)} ({local_heads} KV heads of {shard.head_size}, block size "
                             f"{self.block_size}); tensor parallelism needs it to find each rank's heads")
        spec = KVCacheSpec.from_tensors(tensors, num_blocks=self.num_blocks, block_dim=bdim, dim_names=dims,
                                        block_size=self.block_size, num_layers=len(tensors), layout="vllm-engine",
                                        num_kv_heads=shard.num_kv_heads if dims is not None else 0,
                                        head_size=shard.head_size, tp_size=shard.tp_size, tp_rank=self.tp_rank)
        opts = dict(s.transport_options)
        if s.backend != "loopback":
            opts.setdefault("listen", rank_address(s.listen, self.tp_rank))
        if s.auth_token:
            opts["auth_token"] = s.auth_token
        self.conn = KVConnector(s.backend, mode=s.mode, hold_timeout=s.hold_timeout, load_timeout=s.load_timeout,
                                checksum=s.checksum, layerwise=False, **opts)
        self.conn.register_kv_caches(tensors, spec)
        log.info("P2pKvConnector worker (TP rank %d of %d): %d KV tensors of shape %s, strides %s (%d blocks, "
                 "%d bytes/block) registered on %s (%s, %s mode)", self.tp_rank, shard.tp_size, len(tensors),
                 tuple(tensors[0].shape), tensors[0].stride(), spec.num_blocks, spec.bytes_per_block,
                 self.conn.address, s.backend, s.mode)

    @property
    def metrics_path(self) -> str | None:
        """Where this worker writes its counters: `metrics_path`, or with TP one file per rank (`x.tp1.json`)."""
        path = self.settings.metrics_path
        if not path or self.shard.tp_size == 1:
            return path
        root, ext = os.path.splitext(path)
        return f"{root}.tp{self.tp_rank}{ext}"

    def handshake(self) -> P2pKvHandshake | None:
        if self.conn is None:
            return None
        own = self.conn.address
        if not self.settings.advertise:
            return P2pKvHandshake(own)
        host, _, port = self.settings.advertise.rpartition(":")
        return P2pKvHandshake(rank_address(self.settings.advertise, self.tp_rank) if port not in ("", "0")
                              else f"{host}:{own.rpartition(':')[2]}")

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
            log.debug("request %s: loading %d blocks from %s", ld.req, len(ld.blocks), ", ".join(ld.peers))
            self._load_started[ld.req] = now
            self.conn.load(ld.req, ld.blocks, peer=list(ld.peers), remote_request_id=ld.key,
                           remote_block_ids=ld.remote_blocks, remote_offset=ld.offset)
        for d in meta.discards:
            self.conn.discard(list(d.peers), d.key)
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
        if self.metrics_path:
            self._write_json(self.metrics_path)
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
            if self.metrics_path:
                self._write_json(self.metrics_path)
            self.conn.close()
            self.conn = None
