"""KVConnector: the engine-facing facade. It checks arguments, routes typed messages
to the producer or consumer side, and makes progress only inside the engine's own
calls (`save`, `load`, `get_finished`, `wait_layer`): per-peer dials are polled there
(links.py), and run natively where the transport can."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from p2pkv.connector.consumer import Consumer
from p2pkv.connector.layers import LayerMap
from p2pkv.connector.links import Links
from p2pkv.connector.messages import BadMessage, ToConsumer, ToProducer, parse
from p2pkv.connector.producer import Producer
from p2pkv.connector.records import ConnectorStats, Finished, LoadFailure
from p2pkv.layout import KVCacheSpec, block_ids
from p2pkv.transport import TransferError, Transport, get_transport
from p2pkv.transport.base import off_engine_cpus

IDLE_PUMP_S = 0.05  # an engine that made no call for this long is idle: a thread of ours moves its work
STEP_IDLE_S = 1.0  # ...unless a step is open (a call came, get_finished() not yet): then only after this long

__all__ = ["KVConnector", "Finished", "LoadFailure", "MODES"]

log = logging.getLogger("p2pkv.connector")
MODES = ("pull", "push")
PUSH_WAIT_SLICE = 0.001  # push wait_layer: landings arrive as notifs, which the transport gives no way to wait for


def _check_request_id(request_id: Any, what: str = "request id") -> str:
    if not isinstance(request_id, str):
        raise TypeError(f"{what}s are str, got {type(request_id).__name__} {request_id!r}")
    return request_id


def _peers(request_id: str, peer: Any) -> list[str]:
    """The producer's address, or a P group's addresses in rank order, as a non-empty list."""
    peers = [peer] if isinstance(peer, str) else list(peer) if isinstance(peer, (list, tuple)) else None
    if not peers or not all(isinstance(p, str) and p for p in peers):
        raise TypeError(f"request {request_id!r}: peer must be the producer's address string, or a P group's "
                        f"addresses in rank order, got {peer!r}")
    return peers


def _block_ids(request_id: str, ids: Any, what: str, num_blocks: int | None = None,
               distinct: bool = False) -> np.ndarray:
    """layout.block_ids for one request's list (never a single int), its error naming the request."""
    try:
        return block_ids(ids, what, num_blocks, distinct=distinct, scalar=False)
    except ValueError as e:
        raise ValueError(f"request {request_id!r}: {e}") from None


class KVConnector:
    """Save and load requests' KV blocks between engines (see the package docstring).

    `KVConnector("tcp", mode="pull", hold_timeout=60, load_timeout=30, checksum=False,
    layerwise=True, listen="127.0.0.1:0", auth_token=...)`; extra keywords go to the
    transport. `layerwise=False` reads a pull load in one transfer (fewer round
    trips) when nobody waits per layer. Call `get_finished()` every engine step:
    that call is what moves every request along.
    """

    def __init__(self, backend: str | Transport = "tcp", *, mode: str = "pull", hold_timeout: float = 60.0,
                 load_timeout: float = 30.0, checksum: bool = False, layerwise: bool = True,
                 **transport_options: Any):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if hold_timeout <= 0 or load_timeout <= 0:
            raise ValueError("hold_timeout and load_timeout must be positive seconds")
        self.mode, self.checksum, self.layerwise = mode, bool(checksum), bool(layerwise)
        self.hold_timeout, self.load_timeout = float(hold_timeout), float(load_timeout)
        self.transport = backend if isinstance(backend, Transport) else get_transport(backend, **transport_options)
        self.spec: KVCacheSpec | None = None
        self.layer_map: LayerMap | None = None
        self.metrics: Counter[str] = Counter()
        self.links = Links(self.transport)
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._stop = threading.Event()
        self._last_call = time.monotonic()
        self._step_open = False  # an engine call came and the step's get_finished() has not yet

    # ----------------------------------------------------------------------- set-up
    def register_kv_caches(self, tensors: Sequence[torch.Tensor], spec: KVCacheSpec,
                           layers: Sequence[Sequence[int]] | None = None) -> KVCacheSpec:
        """Register the engine's KV tensors as they are. `layers[i]` lists the tensor
        indices that hold layer i; by default each tensor is one layer (or, when a
        single tensor holds every layer, that tensor is the one "layer")."""
        if self._closed:
            raise RuntimeError("connector is closed")
        if self.spec is not None:
            raise RuntimeError("KV caches are already registered with this connector")
        self.transport.register(tensors, spec)
        layer_map = LayerMap(spec, self.transport.regions, layers)
        self.spec, self.layer_map = spec, layer_map
        self.producer = Producer(self.transport, layer_map, self.links, hold_timeout=self.hold_timeout,
                                 checksum=self.checksum, metrics=self.metrics)
        self.consumer = Consumer(self.transport, layer_map, self.links, mode=self.mode, checksum=self.checksum,
                                 layerwise=self.layerwise, load_timeout=self.load_timeout, metrics=self.metrics)
        threading.Thread(target=self._idle_pump, name="p2pkv-connector-idle", daemon=True).start()
        return spec

    def _idle_pump(self) -> None:
        """Move requests along while the engine makes no calls. An engine steps only while it has
        work of its own: a vLLM P whose prefills are done sits idle while a dial to D, the pushes it
        allows, or D's releases wait. An engine's own calls do all of this while it is stepping (no
        thread of ours on a request's path); this thread takes over only after IDLE_PUMP_S without
        one, or STEP_IDLE_S inside a step: an engine computing a step (between its first call and its
        get_finished()) needs the GIL, and a thread of ours that takes it there can stall the step for
        as long as the OS keeps that thread off a busy core."""
        off_engine_cpus()
        while not self._stop.wait(IDLE_PUMP_S):
            quiet = time.monotonic() - self._last_call
            if quiet < IDLE_PUMP_S or (self._step_open and quiet < STEP_IDLE_S):
                continue
            with self._lock:
                if self._closed or self.producer is None or self.consumer is None:
                    return
                if self.producer.busy() or self.consumer.busy() or self.links.setting_up():
                    self._progress(engine=False)

    def _engine_call(self) -> None:
        """An engine call inside a step: keep the idle pump away until the step's get_finished()."""
        self._last_call = time.monotonic()
        self._step_open = True

    @property
    def address(self) -> str:
        """Where peers reach this connector (the transport's address)."""
        return self.transport.address

    @property
    def layers(self) -> list[list[int]]:
        """The registered tensor indices of each layer."""
        return self.layer_map.groups if self.layer_map is not None else []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ----------------------------------------------------------------------- producer
    def save(self, request_id: str, block_ids: Sequence[int], *, layer: int | None = None,
             ready: Callable[[], None] | None = None, final: bool | None = None) -> None:
        """Publish (pull) or send (push) request `request_id`'s blocks; with `layer`,
        only that layer is ready (P may call this per layer while it computes the
        next one). `ready`, if given, is called before the layer's bytes are read
        (e.g. a CUDA event's `synchronize`, for a layer still being computed). The
        blocks stay held until D confirms or `hold_timeout` passes, counted from the
        save that makes the request final (by default: once every layer is saved;
        `final=False` keeps it open, e.g. until the engine has finished the request,
        so the end is never reported before the engine lets go of the blocks)."""
        spec, producer, _ = self._check_usable()
        _check_request_id(request_id)
        blocks = _block_ids(request_id, block_ids, "block", spec.num_blocks)
        layers = set(range(self.num_layers)) if layer is None else {self._check_layer(layer)}
        self._engine_call()
        with self._lock:
            self._read_messages(time.monotonic())
            producer.save(request_id, blocks, layers, ready, final, time.monotonic())

    def release(self, request_id: str) -> None:
        """Drop a hold now (the engine aborted the request); it is reported as saved once
        no write of its blocks is in flight any more."""
        _, producer, _ = self._check_usable()
        self._engine_call()
        with self._lock:
            producer.release(request_id)

    def transfer_params(self, request_id: str) -> dict[str, Any]:
        """What D needs to load a held request: where P is, which blocks, which request."""
        _, producer, _ = self._check_usable()
        with self._lock:
            h = producer.holds.get(request_id)
            if h is None:
                raise KeyError(f"request {request_id!r} is not held here (never saved, or already released)")
            return {"remote_address": self.address, "remote_request_id": request_id,
                    "remote_block_ids": h.blocks.tolist(), "mode": self.mode}

    def holding(self) -> dict[str, list[int]]:
        """Requests whose blocks this producer still holds, with their block ids."""
        with self._lock:
            if self.producer is None:
                return {}
            return {k: h.blocks.tolist() for k, h in self.producer.holds.items()}

    def stats(self) -> ConnectorStats:
        """A snapshot of this connector's counters and of the holds it keeps now (read-only)."""
        with self._lock:
            held = len(self.producer.holds) if self.producer is not None else 0
            return ConnectorStats.from_counter(self.metrics, held)

    # ----------------------------------------------------------------------- consumer
    def load(self, request_id: str, block_ids: Sequence[int], *, peer: str | Sequence[str],
             remote_request_id: str | None = None, remote_block_ids: Sequence[int] | None = None,
             remote_offset: int = 0) -> None:
        """Fill local `block_ids` with the peer's copy of the request, asynchronously.

        Pull needs `remote_block_ids` (P's blocks, in the same order); push sends
        our block ids to P, which writes P's blocks `[remote_offset:]` into them.
        `peer` is the producer's address, or (pull) the addresses of a tensor-parallel P
        group in rank order: this rank then reads its heads from the P ranks holding them.
        The outcome comes back from `get_finished()`."""
        spec, _, consumer = self._check_usable()
        _check_request_id(request_id)
        if remote_request_id is not None:
            _check_request_id(remote_request_id, "remote request id")
        peers = _peers(request_id, peer)
        blocks = _block_ids(request_id, block_ids, "block", spec.num_blocks, distinct=True)
        remote = None if remote_block_ids is None else _block_ids(request_id, remote_block_ids, "remote block")
        if isinstance(remote_offset, bool) or not isinstance(remote_offset, (int, np.integer)) or remote_offset < 0:
            raise ValueError(f"request {request_id!r}: remote_offset must be a non-negative integer, "
                             f"got {remote_offset!r}")
        if self.mode == "pull" and (remote is None or len(remote) != len(blocks)):
            raise ValueError(f"request {request_id!r}: pull needs remote_block_ids of the same length as block_ids "
                             f"({len(blocks)}), got {None if remote is None else len(remote)}")
        self._engine_call()
        with self._lock:
            self._read_messages(time.monotonic())
            if len(peers) == 1 and spec.tp_size == 1:
                consumer.load(request_id, blocks, peers[0], remote_request_id or request_id, remote,
                              int(remote_offset), time.monotonic())
            else:
                if remote is None:
                    raise ValueError(f"request {request_id!r}: loading from a P group of {len(peers)} ranks "
                                     "needs pull mode")
                consumer.load_sharded(request_id, blocks, peers, remote_request_id or request_id, remote,
                                      int(remote_offset), time.monotonic())

    def discard(self, peer: str | Sequence[str], remote_request_id: str) -> None:
        """Tell the producer at `peer` (or the P group at these addresses, in rank order) that we
        will not load `remote_request_id` (e.g. a local prefix-cache hit covered it), so it can
        release its blocks now."""
        spec, _, consumer = self._check_usable()
        _check_request_id(remote_request_id, "remote request id")
        peers = _peers(remote_request_id, peer)
        self._engine_call()
        with self._lock:
            if len(peers) == 1 and spec.tp_size == 1:
                consumer.discard(peers[0], remote_request_id)
            else:
                consumer.discard_sharded(peers, remote_request_id)

    def wait_layer(self, request_id: str, layer: int, timeout: float | None = None) -> bool:
        """Block until `layer` of a loading request has landed; False if it failed, the
        request is no longer loading, or `timeout` passed. Pull waits on the layer's
        read handle (or, before its first contact, on the producer's dial); push polls
        for P's landing notes every millisecond, as the transport offers no wait for them."""
        self._check_layer(layer)
        _, _, consumer = self._check_usable()
        self._engine_call()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._progress()
                state = consumer.layer_state(request_id, layer)
                ld = consumer.pending(request_id, layer)
            if state is not None:
                return state
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            if ld is None:
                return False
            handle = ld.handles.get(layer)
            if handle is not None and not handle.done():
                try:
                    handle.wait(left)
                except TransferError:
                    pass
            elif self.mode == "pull" and ld.reads is None:
                ld.link.wait_settled(left)
            else:
                time.sleep(PUSH_WAIT_SLICE if left is None else min(left, PUSH_WAIT_SLICE))

    def busy(self) -> bool:
        """True while any hold or load is outstanding."""
        with self._lock:
            return bool(self.producer is not None and (self.producer.busy() or self.consumer.busy()))

    def get_finished(self) -> Finished:
        """Move every request along (post, poll, read messages, expire), then report the holds
        released and loads ended since the last call. Call it every engine step."""
        with self._lock:
            if self.producer is None or self._closed:
                return Finished()
            self._progress()
            self._step_open = False
            loaded, failed = self.consumer.take_finished()
            return Finished(saved=self.producer.take_ended(), loaded=loaded, failed=failed)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._closed = True
        self.links.close()
        self.transport.close()

    def __enter__(self) -> "KVConnector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- internals
    def _check_usable(self) -> tuple[KVCacheSpec, Producer, Consumer]:
        if self._closed:
            raise RuntimeError("connector is closed")
        if self.spec is None or self.producer is None or self.consumer is None:
            raise RuntimeError("register_kv_caches() the engine's KV tensors before saving or loading")
        return self.spec, self.producer, self.consumer

    def _check_layer(self, layer: int) -> int:
        if self.layer_map is None:
            raise RuntimeError("register_kv_caches() the engine's KV tensors before saving or loading")
        return self.layer_map.check(layer)

    def _progress(self, engine: bool = True) -> None:
        """One pass of work, in the caller's thread: read peers' messages, then let each side
        poll its transfers, post what became possible and expire what ran out of time."""
        assert self.producer is not None and self.consumer is not None
        now = time.monotonic()
        if engine:
            self._last_call = now
        self.links.poll()
        self._read_messages(now)
        self.producer.progress(now)
        self.consumer.progress(now)

    def _read_messages(self, now: float) -> None:
        """Hand each message that arrived to the side it is for (a save must see D's cancel first)."""
        assert self.producer is not None and self.consumer is not None
        for n in self.transport.get_notifs():
            try:
                msg = parse(n.message)
            except BadMessage as e:
                log.warning("ignoring a malformed control message from %s: %s", n.peer, e)
                continue
            try:
                if isinstance(msg, ToProducer):
                    self.producer.on_message(msg, self.transport.reply_address(n.peer), now)
                elif isinstance(msg, ToConsumer):
                    self.consumer.on_message(msg, self.transport.reply_address(n.peer) or n.peer)
            except Exception:  # noqa: BLE001 - what a peer sends must never fail the engine's call
                log.exception("request %r: handling %s from %s failed; message dropped", msg.req, msg.kind, n.peer)
