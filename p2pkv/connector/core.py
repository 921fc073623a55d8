"""KVConnector: the producer and consumer halves of the engine-neutral connector,
its control messages (see the package docstring) and the pump thread that drives
them over a transport."""
from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from p2pkv.connector.records import Finished, Hold as _Hold, Load as _Load, LoadFailure, message as _msg
from p2pkv.layout import KVCacheSpec, block_ids, plan_segments
from p2pkv.segments import Segments
from p2pkv.transport import Notif, TransferError, TransferHandle, Transport, get_transport

__all__ = ["KVConnector", "Finished", "LoadFailure", "MODES"]

log = logging.getLogger("p2pkv.connector")
MODES = ("pull", "push")
GONE_KEPT = 1 << 16  # holds ended without D's confirmation that the producer still recognises


def _check_request_id(request_id: Any, what: str = "request id") -> str:
    if not isinstance(request_id, str):
        raise TypeError(f"{what}s are str, got {type(request_id).__name__} {request_id!r}")
    return request_id


def _block_ids(request_id: str, ids: Any, what: str, num_blocks: int | None = None,
               distinct: bool = False) -> np.ndarray:
    """layout.block_ids for one request's list (never a single int), its error naming the request."""
    try:
        return block_ids(ids, what, num_blocks, distinct=distinct, scalar=False)
    except ValueError as e:
        raise ValueError(f"request {request_id!r}: {e}") from None


class KVConnector:
    """Save and load requests' KV blocks between engines (see module docstring).

    `KVConnector("tcp", mode="pull", hold_timeout=60, load_timeout=30, checksum=False,
    layerwise=True, listen="127.0.0.1:0", auth_token=...)`; extra keywords go to the
    transport. `layerwise=False` reads a pull load in one transfer (fewer round
    trips) when nobody waits per layer.
    """

    def __init__(self, backend: str | Transport = "tcp", *, mode: str = "pull", hold_timeout: float = 60.0,
                 load_timeout: float = 30.0, checksum: bool = False, poll_interval: float = 0.005,
                 layerwise: bool = True, **transport_options: Any):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if hold_timeout <= 0 or load_timeout <= 0:
            raise ValueError("hold_timeout and load_timeout must be positive seconds")
        self.mode, self.checksum, self.layerwise = mode, bool(checksum), bool(layerwise)
        self.hold_timeout, self.load_timeout, self.poll_interval = float(hold_timeout), float(load_timeout), poll_interval
        self.transport = backend if isinstance(backend, Transport) else get_transport(backend, **transport_options)
        self.spec: KVCacheSpec | None = None
        self.layers: list[list[int]] = []
        self.metrics: Counter[str] = Counter()
        self._holds: dict[str, _Hold] = {}
        self._wants: dict[str, tuple[np.ndarray, str, int, float]] = {}
        self._loads: dict[str, _Load] = {}
        self._early: dict[str, tuple[str, float]] = {}
        self._ended: dict[str, bool] = {}
        self._gone: dict[str, None] = {}
        self._fin = Finished()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._outbox: list[tuple[str, dict[str, Any]]] = []
        self._kicked = False
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------- set-up
    def register_kv_caches(self, tensors: Sequence[torch.Tensor], spec: KVCacheSpec,
                           layers: Sequence[Sequence[int]] | None = None) -> KVCacheSpec:
        """Register the engine's KV tensors as they are. `layers[i]` lists the tensor
        indices that hold layer i; by default each tensor is one layer (or, when a
        single tensor holds every layer, that tensor is the one "layer")."""
        if self._stop.is_set():
            raise RuntimeError("connector is closed")
        if self.spec is not None:
            raise RuntimeError("KV caches are already registered with this connector")
        self.transport.register(tensors, spec)
        self.spec = spec
        self.layers = [list(g) for g in layers] if layers is not None else [[i] for i in range(len(spec.regions))]
        if sorted(i for g in self.layers for i in g) != list(range(len(spec.regions))):
            raise ValueError(f"layers {self.layers} must name every registered tensor index exactly once")
        self.transport.on_notif(self._kick)
        self._thread = threading.Thread(target=self._pump, name="p2pkv-connector", daemon=True)
        self._thread.start()
        return spec

    @property
    def address(self) -> str:
        """Where peers reach this connector (the transport's address)."""
        return self.transport.address

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
        spec = self._check_usable()
        _check_request_id(request_id)
        blocks = _block_ids(request_id, block_ids, "block", spec.num_blocks)
        layers = set(range(self.num_layers)) if layer is None else {self._check_layer(layer)}
        with self._cv:
            h = self._holds.get(request_id)
            if h is None:
                h = self._holds[request_id] = _Hold(request_id, blocks, set(), time.monotonic() + self.hold_timeout)
                self.metrics["saved_requests"] += 1
            elif len(blocks) != len(h.blocks) or np.any(h.blocks != blocks):
                raise ValueError(f"request {request_id!r}: save() got blocks {list(block_ids)} but earlier layers "
                                 f"were saved from {h.blocks.tolist()}")
            h.saved |= layers
            if ready is not None:
                for i in layers:
                    h.ready[i] = ready
            if (len(h.saved) == self.num_layers if final is None else final) and not h.final:
                h.final, h.deadline = True, time.monotonic() + self.hold_timeout
                if h.pending_end is not None:
                    self._end_hold(request_id, h.pending_end)
            if request_id in self._early and len(h.saved) == self.num_layers:
                self._end_hold(request_id, self._early.pop(request_id)[0])
            self._cv.notify_all()

    def release(self, request_id: str) -> None:
        """Drop a hold now (the engine aborted the request); it is reported as saved once
        no write of its blocks is in flight any more."""
        with self._cv:
            h = self._holds.get(request_id)
            if h is not None and h.inflight:
                h.stop, h.want = "released_aborted", None
                del self._holds[request_id]
            elif h is not None:
                self._end_hold(request_id, "released_aborted", force=True)

    def transfer_params(self, request_id: str) -> dict[str, Any]:
        """What D needs to load a held request: where P is, which blocks, which request."""
        with self._cv:
            h = self._holds.get(request_id)
            if h is None:
                raise KeyError(f"request {request_id!r} is not held here (never saved, or already released)")
            return {"remote_address": self.address, "remote_request_id": request_id,
                    "remote_block_ids": h.blocks.tolist(), "mode": self.mode}

    def holding(self) -> dict[str, list[int]]:
        """Requests whose blocks this producer still holds, with their block ids."""
        with self._cv:
            return {k: h.blocks.tolist() for k, h in self._holds.items()}

    # ----------------------------------------------------------------------- consumer
    def load(self, request_id: str, block_ids: Sequence[int], *, peer: str, remote_request_id: str | None = None,
             remote_block_ids: Sequence[int] | None = None, remote_offset: int = 0) -> None:
        """Fill local `block_ids` with the peer's copy of the request, asynchronously.

        Pull needs `remote_block_ids` (P's blocks, in the same order); push sends
        our block ids to P, which writes P's blocks `[remote_offset:]` into them.
        The outcome comes back from `get_finished()`."""
        spec = self._check_usable()
        _check_request_id(request_id)
        if remote_request_id is not None:
            _check_request_id(remote_request_id, "remote request id")
        blocks = _block_ids(request_id, block_ids, "block", spec.num_blocks, distinct=True)
        remote = None if remote_block_ids is None else _block_ids(request_id, remote_block_ids, "remote block")
        if not isinstance(remote_offset, (int, np.integer)) or remote_offset < 0:
            raise ValueError(f"request {request_id!r}: remote_offset must be a non-negative integer, "
                             f"got {remote_offset!r}")
        if self.mode == "pull" and (remote is None or len(remote) != len(blocks)):
            raise ValueError(f"request {request_id!r}: pull needs remote_block_ids of the same length as block_ids "
                             f"({len(blocks)}), got {None if remote is None else len(remote)}")
        with self._cv:
            if request_id in self._loads:
                raise ValueError(f"request {request_id!r} is already loading")
            self._loads[request_id] = _Load(request_id, blocks, peer, remote_request_id or request_id, remote,
                                            int(remote_offset), time.monotonic() + self.load_timeout)
            self._cv.notify_all()

    def discard(self, peer: str, remote_request_id: str) -> None:
        """Tell the producer at `peer` that we will not load `remote_request_id` (e.g. a
        local prefix-cache hit covered it), so it can release its blocks now."""
        self._check_usable()
        with self._cv:
            self._outbox.append((peer, _msg("cancel", remote_request_id)))
            self._cv.notify_all()

    def wait_layer(self, request_id: str, layer: int, timeout: float | None = None) -> bool:
        """Block until `layer` of a loading request has landed; False if it failed or
        the request is no longer loading."""
        self._check_layer(layer)
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                ld = self._loads.get(request_id)
                if ld is None:
                    return self._ended.get(request_id, False)
                if layer in ld.done:
                    return ld.done[layer]
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)

    def busy(self) -> bool:
        """True while any hold, load or control message is outstanding."""
        with self._cv:
            return bool(self._holds or self._loads or self._outbox)

    def get_finished(self) -> Finished:
        """Holds released and loads ended since the last call."""
        with self._cv:
            out, self._fin = self._fin, Finished()
            return out

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.transport.close()

    def __enter__(self) -> "KVConnector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- internals
    def _check_usable(self) -> KVCacheSpec:
        if self._stop.is_set():
            raise RuntimeError("connector is closed")
        if self.spec is None:
            raise RuntimeError("register_kv_caches() the engine's KV tensors before saving or loading")
        return self.spec

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer

    def _layer_segments(self, full: Segments, layer: int) -> Segments:
        m = np.isin(full.region, self.layers[layer])
        plan = full.plan.only(self.layers[layer]) if full.plan is not None else None
        return Segments(full.region[m], full.src[m], full.dst[m], full.length[m], plan)

    def _block_sums(self, blocks: np.ndarray, layer: int) -> list[int]:
        """CRC32 of each block's bytes in one layer, in the block's logical byte order."""
        spec = self.spec
        assert spec is not None
        sums = [0] * len(blocks)
        for r in self.layers[layer]:
            reg = spec.regions[r]
            flat = self.transport.regions[r]
            if flat.device.type != "cpu":
                flat = flat.cpu()
            arr = flat.numpy()
            for i, b in enumerate(blocks.tolist()):
                for off, n in reg.spans:
                    start = b * reg.block_stride + off
                    sums[i] = zlib.crc32(arr[start:start + n], sums[i])
        return sums

    def _end_hold(self, key: str, how: str, force: bool = False) -> None:
        """End a hold and report it, unless the producer has not made it final yet:
        then the end waits for that save."""
        h = self._holds.get(key)
        if h is not None and not h.final and not force:
            h.pending_end = h.pending_end or how
            return
        if self._holds.pop(key, None) is not None:
            self._report_end(key, how)

    def _report_end(self, key: str, how: str) -> None:
        """Count how a hold ended and report it saved; one that D did not confirm is remembered as gone."""
        self.metrics[how] += 1
        self._fin.saved.add(key)
        if how != "released_confirmed":
            self._gone[key] = None
            if len(self._gone) > GONE_KEPT:
                del self._gone[next(iter(self._gone))]

    def _end_load(self, ld: _Load, error: str | None) -> None:
        self._loads.pop(ld.key, None)
        if error is None and not ld.bad:
            self.metrics["loaded_requests"] += 1
            self.metrics["loaded_blocks"] += len(ld.blocks)
        else:
            failed = set(range(len(ld.blocks))) if error is not None else ld.bad
            blocks = tuple(int(ld.blocks[i]) for i in sorted(failed))
            missing = set(range(ld.sent, len(ld.blocks))) if ld.sent is not None else set()
            parts = [f"the producer sent only {ld.sent} of {len(ld.blocks)} blocks"] if missing else []
            if ld.bad - missing:
                parts.append(f"checksum mismatch in {len(ld.bad - missing)} block(s)")
            reason = error or "; ".join(parts)
            self._fin.failed[ld.key] = LoadFailure(blocks, f"request {ld.key!r} from {ld.peer_address}: {reason}")
            self.metrics["load_failures"] += 1
            self.metrics["failed_blocks"] += len(blocks)
            self.metrics["loaded_blocks"] += len(ld.blocks) - len(blocks)
            log.warning("load of request %r from %s failed for %d of %d blocks: %s", ld.key, ld.peer_address,
                        len(blocks), len(ld.blocks), reason)
        if self.mode == "pull" or error is not None:
            kind = "release" if self.mode == "pull" else "cancel"
            self._outbox.append((ld.peer_address, _msg(kind, ld.remote_key, ok=error is None and not ld.bad)))
        self._fin.loaded.add(ld.key)
        self._ended[ld.key] = ld.key not in self._fin.failed
        if len(self._ended) > 4096:
            del self._ended[next(iter(self._ended))]
        self._cv.notify_all()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the pump must survive anything one request does
                log.exception("p2pkv connector step failed")
            with self._cv:
                if not self._kicked and not self._outbox:
                    self._cv.wait(self.poll_interval)
                self._kicked = False

    def _kick(self) -> None:
        """A notification arrived: wake the pump now. Never blocks (it runs on a transport thread, which may
        be a peer's pump in loopback), so when the lock is busy the flag makes the pump skip its next wait."""
        self._kicked = True
        if self._cv.acquire(blocking=False):
            try:
                self._cv.notify_all()
            finally:
                self._cv.release()

    def _step(self) -> None:
        for n in self.transport.get_notifs():
            self._on_notif(n)
        now = time.monotonic()
        with self._cv:
            for key, h in list(self._holds.items()):
                if h.final and h.deadline < now and h.inflight == 0:
                    log.warning("request %r: D did not confirm within %.3g s; releasing its %d blocks",
                                key, self.hold_timeout, len(h.blocks))
                    self._end_hold(key, "released_timeout")
            for key, (_, _, _, deadline) in list(self._wants.items()):
                if deadline < now:
                    del self._wants[key]
            for key, (_, deadline) in list(self._early.items()):
                if deadline < now:
                    del self._early[key]
            for ld in list(self._loads.values()):
                if ld.deadline < now:
                    # Reads still posted may land later: report only once they ended (the transport's
                    # timeout bounds that), so no late byte reaches blocks the engine reused.
                    ld.error = ld.error or f"not loaded within the {self.load_timeout:g} s load timeout"
                    if not ld.reads_pending:
                        self._end_load(ld, ld.error)
            todo_loads = [ld for ld in self._loads.values() if not ld.started]
            for ld in todo_loads:
                ld.started = True
            self._match_wants()
            todo_push = [h for h in self._holds.values() if h.want is not None and h.saved - h.written]
            outbox, self._outbox = self._outbox, []
        for ld in todo_loads:
            self._start_load(ld)
        for h in todo_push:
            self._push(h)
        for address, msg in outbox:
            self._notify(address, msg)

    def _notify(self, address: str, msg: dict[str, Any]) -> bool:
        try:
            self.transport.send_notif(self.transport.connect(address), msg)
            return True
        except (TransferError, OSError, ValueError) as e:
            log.info("could not send %s for request %r to %s: %s", msg.get("p2pkv"), msg.get("req"), address, e)
            return False

    def _start_load(self, ld: _Load) -> None:
        try:
            ld.peer = self.transport.connect(ld.peer_address)
        except (TransferError, OSError, ValueError) as e:
            with self._cv:
                if ld.key in self._loads:
                    self._end_load(ld, f"cannot reach the producer: {e}")
            return
        if self.mode == "push":
            msg = _msg("want", ld.remote_key, blocks=ld.blocks.tolist(), offset=ld.remote_offset, addr=self.address)
            try:
                self.transport.send_notif(ld.peer, msg)
            except TransferError as e:
                with self._cv:
                    if ld.key in self._loads:
                        self._end_load(ld, f"cannot reach the producer: {e}")
            return
        assert ld.remote_blocks is not None and self.spec is not None and ld.peer.spec is not None
        try:
            full = plan_segments(ld.peer.spec, self.spec, ld.remote_blocks, ld.blocks)
        except ValueError as e:
            with self._cv:
                self._end_load(ld, f"bad plan: {e}")
            return
        groups = [[layer] for layer in range(self.num_layers)] if self.layerwise else [list(range(self.num_layers))]
        with self._cv:
            ld.reads_pending = len(groups)
        for layers in groups:
            segs = full if not self.layerwise else self._layer_segments(full, layers[0])
            h = self.transport.read(ld.peer, segs, request_id=ld.key)
            h.add_done_callback(lambda hh, ld=ld, layers=layers: self._on_read(ld, layers, hh))

    def _on_read(self, ld: _Load, layers: list[int], h: TransferHandle) -> None:
        with self._cv:
            if self._loads.get(ld.key) is not ld:
                return
            ld.reads_pending -= 1
            for layer in layers:
                ld.done[layer] = h.error is None
            if h.error is not None:
                ld.error = ld.error or str(h.error)
            else:
                self.metrics["loaded_bytes"] += h.nbytes
            self._cv.notify_all()
            if len(ld.done) < self.num_layers:
                return
            if ld.error is not None:
                self._end_load(ld, ld.error)
            else:
                ld.awaiting_answer = True
                ask = (_msg("sum?", ld.remote_key, blocks=ld.remote_blocks.tolist(), addr=self.address)
                       if self.checksum else _msg("held?", ld.remote_key, addr=self.address))
                self._outbox.append((ld.peer_address, ask))

    def _push(self, h: _Hold) -> None:
        assert self.spec is not None
        with self._cv:
            if self._holds.get(h.key) is not h or h.want is None:
                return
            dst, addr = h.want
        try:
            if h.peer is None:
                h.peer = self.transport.connect(addr)
            src = h.blocks[h.offset:][:len(dst)]
            full = plan_segments(self.spec, h.peer.spec, src, dst[:len(src)])
        except (TransferError, OSError, ValueError) as e:
            log.warning("request %r: cannot push to %s: %s", h.key, addr, e)
            with self._cv:
                self._end_hold(h.key, "released_error")
            return
        with self._cv:
            if self._holds.get(h.key) is not h or h.want is None:
                return
            layers = sorted(h.saved - h.written)
            h.written |= set(layers)
            h.inflight += len(layers)
            self.metrics["layers_pushed"] += len(layers)
            if not h.final:
                self.metrics["layers_pushed_before_final"] += len(layers)
        for layer in layers:
            fn = h.ready.pop(layer, None)
            if fn is not None:
                fn()
            sums = self._block_sums(src, layer) if self.checksum else None
            note = _msg("landed", h.key, layer=layer, sums=sums, n=len(src))
            hh = self.transport.write(h.peer, self._layer_segments(full, layer), request_id=h.key, notify=note)
            hh.add_done_callback(lambda x, h=h: self._on_write(h, x))

    def _on_write(self, h: _Hold, x: TransferHandle) -> None:
        """A push write ended. A hold that was stopped (D gave up, the engine released it,
        a write failed) ends only once none of its writes is in flight any more."""
        with self._cv:
            h.inflight -= 1
            if x.error is not None:
                log.warning("push of request %r failed: %s", h.key, x.error)
                if h.want is not None:
                    self._outbox.append((h.want[1], _msg("abort", h.key, reason=str(x.error))))
                h.want = None
                if self._holds.get(h.key) is h:
                    h.stop = h.stop or "released_error"
            else:
                self.metrics["sent_bytes"] += x.nbytes
            if h.inflight:
                return
            if self._holds.get(h.key) is not h:
                if h.stop is not None:
                    self._report_end(h.key, h.stop)
            elif h.stop is not None:
                self._end_hold(h.key, h.stop)
            elif len(h.written) == self.num_layers:
                self._end_hold(h.key, "released_confirmed")

    def _on_notif(self, n: Notif) -> None:
        m = n.message
        kind, key = m.get("p2pkv"), m.get("req")
        if not isinstance(key, str):
            return
        with self._cv:
            if kind in ("release", "cancel"):
                how = "released_confirmed" if kind == "release" else "released_aborted"
                h = self._holds.get(key)
                if h is None:
                    self._early[key] = (how, time.monotonic() + self.hold_timeout)
                elif h.inflight:
                    h.stop, h.want = how, None
                else:
                    h.want = None
                    self._end_hold(key, how)
                self._wants.pop(key, None)
            elif kind == "want":
                blocks = np.asarray(m.get("blocks") or [], dtype=np.int64)
                self._wants[key] = (blocks, str(m.get("addr")), int(m.get("offset") or 0),
                                    time.monotonic() + self.hold_timeout)
                self._match_wants()
                self._cv.notify_all()
            elif kind in ("landed", "abort"):
                ld = self._find_load(key)
                if ld is None:
                    return
                if kind == "abort":
                    self._end_load(ld, f"producer gave up: {m.get('reason', 'push failed')}")
                    return
                layer = int(m.get("layer", -1))
                if not 0 <= layer < self.num_layers:
                    return
                n_written = int(m.get("n", len(ld.blocks)))
                ld.bad |= set(range(n_written, len(ld.blocks)))
                ld.sent = n_written
                sums = m.get("sums")
                if sums is not None:
                    mine = self._block_sums(ld.blocks[:len(sums)], layer)
                    bad = {i for i, (a, b) in enumerate(zip(mine, sums)) if a != b}
                    self.metrics["checksum_mismatches"] += len(bad - ld.bad)
                    ld.bad |= bad
                ld.done[layer] = True
                self._cv.notify_all()
                if len(ld.done) == self.num_layers:
                    self._end_load(ld, None)
            elif kind == "held?":
                self._outbox.append((str(m.get("addr")), _msg("held", key, gone=key in self._gone)))
            elif kind == "sum?":
                blocks = np.asarray(m.get("blocks") or [], dtype=np.int64)
                sums = [self._block_sums(blocks, layer) for layer in range(self.num_layers)]
                self._outbox.append((str(m.get("addr")), _msg("sum", key, sums=sums, gone=key in self._gone)))
            elif kind in ("held", "sum"):
                ld = self._find_load(key)
                if ld is None or not ld.awaiting_answer:
                    return
                if m.get("gone"):
                    self._end_load(ld, "the producer had released these blocks (its hold_timeout passed or its "
                                       "engine dropped the request), so what was read may be another request's KV")
                    return
                for layer, theirs in enumerate(m.get("sums") or []):
                    mine = self._block_sums(ld.blocks, layer)
                    ld.bad |= {i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b}
                self.metrics["checksum_mismatches"] += len(ld.bad)
                self._end_load(ld, None)

    def _find_load(self, remote_key: str) -> _Load | None:
        for ld in self._loads.values():
            if ld.remote_key == remote_key:
                return ld
        return None

    def _match_wants(self) -> None:
        """Pair D's block lists (push) with the holds they are for; call with the lock held."""
        for key in [k for k in self._wants if k in self._holds and self._holds[k].want is None]:
            blocks, addr, offset, _ = self._wants.pop(key)
            h = self._holds[key]
            h.want, h.offset = (blocks, addr), offset
