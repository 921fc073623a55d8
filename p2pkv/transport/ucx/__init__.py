"""UCX backend over ucxx: one UCX endpoint per peer, made at the handshake, where each
side learns the other's registered regions and remote keys. After that a transfer is
one-sided and posted by the caller's thread: a read GETs every merged segment from the
peer's memory, a write PUTs them into it, then one flush; a write's notify message is
sent only once that flush completed. No Python runs on the peer's side, and none on
this side but the caller's post and poll: UCX completes the requests (inline, or in
ucxx's blocking progress thread), handles read their status (handle.py) and wait
without the GIL (request.py). ctypes bindings to libucp (ucp.py) take the calls
ucxx's Python layer has no API for. The `staged` path (staged.py, for CUDA memory)
still runs on the control plane's threads.

This module sets the transport up (context, worker, registration, one endpoint per peer
at the handshake); link.py is a peer's endpoint and tags, onesided.py the one-sided
transfers and notifications, staged.py the staged path, baseline.py the bench's
baseline, info.py the paths and `describe()`."""
from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import threading
from typing import Any, Sequence

import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport.base import (Peer, PeerClosedError, TransferError, TransferHandle, TransferTimeout,
                                  off_engine_cpus)
from p2pkv.transport.control import Conn, ControlPlaneTransport
from p2pkv.transport.ucx.baseline import UcxBaseline
from p2pkv.transport.ucx.handle import UcxHandle
from p2pkv.transport.ucx.info import FEATURES, PATHS, describe, resolve_path
from p2pkv.transport.ucx.link import Link
from p2pkv.transport.ucx.onesided import MAX_NOTIFY, OneSidedPath
from p2pkv.transport.ucx.request import Req, Requests
from p2pkv.transport.ucx.staged import StagedPath
from p2pkv.transport.ucx.ucp import (INSTALL_HINT, MEM_CUDA, MEM_HOST, OP_FIELD_MEMH, OP_FIELD_MEMORY_TYPE, MapParam,
                                     Param, context_config, load)

__all__ = ["UcxTransport", "describe", "INSTALL_HINT", "PATHS", "MAX_NOTIFY", "resolve_path"]

log = logging.getLogger("p2pkv.transport.ucx")

# bytes per staging slot (4 slots per transport); on an H100, 256 MiB slots moved large requests 2x faster
# than 64 MiB ones (docs/benchmarks.md, ## ucx)
STAGING_CUDA, STAGING_HOST = 256 << 20, 8 << 20


class UcxTransport(OneSidedPath, StagedPath, UcxBaseline, ControlPlaneTransport):
    """`get_transport("ucx", listen="127.0.0.1:0", timeout=30, auth_token=None, path="auto",
    staging_bytes=None (256 MiB per slot for CUDA, 8 MiB for host memory), ucx_config=None)`.

    `path`: 'put' (one zero-copy put per segment), 'staged' (gather, one put per chunk of `staging_bytes`,
    scatter) or 'auto' (staged for CUDA memory when p2pkv's kernels are built, else put); a connection uses
    'staged' only when both sides chose it. `ucx_config` adds UCX settings (names without `UCX_`)."""

    name = "ucx"

    def __init__(self, *, path: str = "auto", staging_bytes: int | None = None,
                 ucx_config: dict[str, str] | None = None, **kw: Any):
        if path not in PATHS:
            raise ValueError(f"ucx path must be one of {PATHS}, got {path!r}")
        if staging_bytes is not None and staging_bytes < 1 << 16:
            raise ValueError(f"staging_bytes must be at least 64 KiB, got {staging_bytes}")
        self._api, self._ucp = load()
        api = self._api
        self._ctx = api.UCXContext({**context_config(), **(ucx_config or {})},
                                   feature_flags=tuple(getattr(api.Feature, f) for f in FEATURES))
        self._worker = api.UCXWorker(self._ctx)
        self._worker.set_progress_thread_start_callback(_progress_thread_start)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
        self._wh = self._worker.handle
        self._addr = bytes(self._worker.address)
        self._rq = Requests(self._ucp, self._ctx.handle)
        self._inflight: list[tuple[Req, Any]] = []  # requests UCX may still write to, with their buffers
        self._inflight_lock = threading.Lock()
        self._prune_at = 64
        self._rx: collections.deque = collections.deque()  # notification receives not complete yet, in order
        self._unnamed: collections.deque = collections.deque()  # (deadline, receive) whose sender is not named yet
        self._rx_lock = threading.Lock()
        self._notif_peers: dict[int, dict[int, str]] = {}  # connection id -> sender is initiator -> peer name
        self._path, self._staging_bytes, self.path = path, staging_bytes, path
        self._memhs: list[int] = []
        self._rkey_blobs: list[bytes] = []
        self._params: list[Any] = []
        self._bases = np.zeros(0, dtype=np.uint64)
        self._mem = MEM_HOST
        self._tls = threading.local()
        self._baseline_bufs: dict[int, Any] = {}
        self._down = False
        try:
            super().__init__(**kw)
        except BaseException:
            self._shutdown_worker()
            raise

    # ------------------------------------------------------------------ registration
    def register(self, tensors: Sequence[torch.Tensor], spec: Any = None) -> Any:
        if self._memhs:
            raise RuntimeError("ucx transport: register() may be called once")
        spec = super().register(tensors, spec)
        dev = self.device
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"ucx transport moves host or CUDA memory, not {dev.type}")
        self._mem = MEM_CUDA if dev.type == "cuda" else MEM_HOST
        bases = []
        for r in self.regions:
            memh = self._map(r.data_ptr(), r.numel(), "mapping KV memory")
            self._params.append(ctypes.byref(Param(op_attr_mask=OP_FIELD_MEMH | OP_FIELD_MEMORY_TYPE,
                                                   memory_type=self._mem, memh=memh)))
            bases.append(r.data_ptr())
        self._bases = np.asarray(bases, dtype=np.uint64)
        if self._mem == MEM_CUDA:
            self._restart_progress_on(dev)
        self.path = resolve_path(self._path, dev)
        if self.path == "staged":
            self._init_staging(self._staging_bytes or (STAGING_CUDA if self._mem == MEM_CUDA else STAGING_HOST))
        return spec

    def _map(self, addr: int, nbytes: int, what: str) -> int:
        memh = ctypes.c_void_p()
        mp = MapParam(field_mask=0b10011, address=addr, length=nbytes, memory_type=self._mem)
        self._check(self._ucp.mem_map(self._ctx.handle, ctypes.byref(mp), ctypes.byref(memh)), what)
        self._memhs.append(memh.value)
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        self._check(self._ucp.rkey_pack(self._ctx.handle, memh, ctypes.byref(buf), ctypes.byref(size)), "packing a key")
        self._rkey_blobs.append(ctypes.string_at(buf, size.value))
        self._ucp.rkey_release(buf)
        return memh.value

    def _restart_progress_on(self, dev: torch.device) -> None:
        """UCX's CUDA transports need the device's context current in every thread that progresses the
        worker; restart the progress thread so that it makes it current first."""
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._worker.stop_progress_thread()
        self._worker.set_progress_thread_start_callback(_progress_thread_start, cb_args=(index,))
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)

    def _bind_cuda(self) -> None:
        if self._mem == MEM_CUDA:
            torch.cuda.set_device(self.device)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise TransferError(f"UCX failed {what}: {self._ucp.status_text(status)}", peer=self.local_name)

    # ------------------------------------------------------------------ handshake hooks
    def _hello_extra(self) -> dict[str, Any]:
        nonce = int.from_bytes(os.urandom(8), "little")
        self._tls.nonce = nonce
        return {"ucx": {"addr": self._addr, "nonce": nonce, "mem": self._mem, "stage": self._stage_hello(),
                        "regions": [[int(b), k] for b, k in zip(self._bases.tolist(), self._rkey_blobs)]}}

    def _on_connect(self, conn: Conn) -> None:
        info = conn.peer.info.get("ucx")
        if not isinstance(info, dict) or not isinstance(info.get("addr"), bytes):
            raise TransferError("peer sent no UCX worker address in its handshake", peer=conn.peer.name)
        self._bind_cuda()
        mine, theirs = int(self._tls.nonce), int(info["nonce"])
        pair = (mine, theirs) if conn.initiator else (theirs, mine)
        cid = int.from_bytes(hashlib.blake2b(b"%d:%d" % pair, digest_size=3).digest(), "little")
        addr = self._api.UCXAddress.create_from_buffer(np.frombuffer(info["addr"], dtype=np.uint8))
        link = Link(self._worker.create_endpoint_from_worker_address(addr, True), cid, conn.initiator)
        try:
            link.rkeys = [self._unpack(link, blob) for _, blob in info["regions"]]
            stage = info.get("stage")
            if stage and self._stage_hello():
                link.staged, link.stage_base, link.stage_slot = True, int(stage[0]), int(stage[2])
                link.stage_rkey = self._unpack(link, stage[1])
        except BaseException:
            self._release(link)
            raise
        link.sizes = np.asarray([r.nbytes for r in conn.peer.spec.regions], dtype=np.int64)  # type: ignore[union-attr]
        link.bases = np.asarray([b for b, _ in info["regions"]], dtype=np.uint64)
        self._notif_peers.setdefault(cid, {})[int(not conn.initiator)] = conn.peer.name
        conn.extra["ucx"] = link

    def _unpack(self, link: Link, blob: bytes) -> int:
        rk = ctypes.c_void_p()
        self._check(self._ucp.rkey_unpack(link.handle, blob, ctypes.byref(rk)), "unpacking the peer's key")
        return rk.value  # type: ignore[return-value]

    def _adopt(self, conn: Conn) -> bool:
        """A dialled connection whose transfers are one-sided needs no op thread: reads, writes and
        notifications are posted by the caller, and the bench's baseline runs in the caller's thread too."""
        link = conn.extra.get("ucx")
        return conn.initiator and link is not None and not link.staged

    def _on_disconnect(self, conn: Conn) -> None:
        link: Link | None = conn.extra.pop("ucx", None)
        if link is not None:
            link.closed = True
            with link.lock:
                self._release(link)

    def _release(self, link: Link) -> None:
        """Close the endpoint first (UCX then completes whatever is still in flight on it, with an error), then
        destroy the keys those operations used."""
        try:
            link.ep.close_blocking(period=1_000_000_000, max_attempts=2)
        except Exception as e:  # noqa: BLE001 - a dead peer's endpoint may refuse a clean close
            log.debug("closing a UCX endpoint: %s", e)
        for rk in link.rkeys + ([link.stage_rkey] if link.stage_rkey else []):
            self._ucp.rkey_destroy(rk)
        link.rkeys, link.stage_rkey = [], 0

    # ------------------------------------------------------------------ transfers: one-sided (onesided.py) or staged
    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        """GET every segment from the peer's memory into ours, then flush; nothing runs on the peer's side."""
        conn = self._conn(peer)
        self._check_request(segments, request_id)
        region = segments.region.astype(np.int64)
        Segments.check_bounds(region, segments.dst, segments.length, [r.nbytes for r in self._require_registered().regions])
        link = conn.extra.get("ucx")
        if link is not None and link.staged:
            return self._read_staged(conn, segments, region, request_id)
        try:
            Segments.check_bounds(region, segments.src, segments.length, [r.nbytes for r in conn.peer.spec.regions])  # type: ignore[union-attr]
        except ValueError as e:
            return UcxHandle(self, conn, link, request_id, segments.nbytes, error=TransferError(
                f"refused before any byte moved: the source {e}", peer=conn.peer.name, request_id=request_id))
        return self._post_rma(conn, self._ucp.get, region, segments.dst, segments.src, segments.length, request_id,
                              segments.nbytes)

    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        """PUT every segment into the peer's memory, flush, and only then send `notify` (see docs/ucx.md)."""
        conn = self._conn(peer)
        self._check_request(segments, request_id, notify)
        region = segments.region.astype(np.int64)
        Segments.check_bounds(region, segments.src, segments.length, [r.nbytes for r in self._require_registered().regions])
        Segments.check_bounds(region, segments.dst, segments.length, [r.nbytes for r in conn.peer.spec.regions])  # type: ignore[union-attr]
        link = conn.extra.get("ucx")
        if link is not None and link.staged:
            return self._write_staged(conn, segments, region, request_id, notify)
        body = None if notify is None else self._note_body(notify, "notify")
        return self._post_rma(conn, self._ucp.put, region, segments.src, segments.dst, segments.length, request_id,
                              segments.nbytes, body)

    def _ucx_error(self, conn: Conn, status: int, what: str, request_id: Any) -> TransferError:
        text = f"UCX error while {what}: {self._ucp.status_text(status)}"
        if status in (-3, -6, -16, -24, -25) or -89 <= status <= -40:  # I/O, unreachable, canceled, not connected,
            return PeerClosedError(text, peer=conn.peer.name, request_id=request_id)  # reset, link/endpoint
        if status == -20:
            return TransferTimeout(text, peer=conn.peer.name, request_id=request_id)
        return TransferError(text, peer=conn.peer.name, request_id=request_id)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        if self._down:
            return
        self._down = True
        try:
            super().close()
        finally:
            self._baseline_bufs.clear()
            self._free_staging()
            for m in self._memhs:
                self._ucp.mem_unmap(self._ctx.handle, m)
            self._memhs = []
            self._shutdown_worker()
            with self._inflight_lock:  # UCX may still hold these requests' memory until the worker goes
                _graveyard.extend(keep for keep in self._inflight if keep[0].in_flight)
                self._inflight = []

    def _shutdown_worker(self) -> None:
        try:
            self._worker.stop_progress_thread()
        except Exception as e:  # noqa: BLE001
            log.debug("stopping the UCX progress thread: %s", e)


_graveyard: list[Any] = []


def _progress_thread_start(cuda_device: int | None = None) -> None:
    """Run first by ucxx's progress thread, which completes this transport's requests: leave the core the
    creating (engine) thread is pinned to, and make the CUDA device current where the memory is CUDA."""
    off_engine_cpus()
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)
