"""UCX backend over ucxx: one UCX endpoint per peer, made at the handshake, where each
side learns the other's registered regions and remote keys. After that a transfer is
one-sided and posted by the caller's thread: a read GETs every merged segment from the
peer's memory, a write PUTs them into it, then one flush; a write's notify message is
sent only once that flush completed. No Python runs on the peer's side, and none on
this side but the caller's post and poll: UCX completes the requests (inline, or in
ucxx's blocking progress thread), handles read their status (handle.py) and wait
without the GIL (request.py). ctypes bindings to libucp (ucp.py) take the calls
ucxx's Python layer has no API for. The `staged` path (staged.py, for CUDA memory)
still runs on the control plane's threads."""
from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Sequence

import msgpack
import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport.ucx.ucp import (ERR_LAST, INPROGRESS, INSTALL_HINT, MEM_CUDA, MEM_HOST, OP_FIELD_MEMH,
                                     OP_FIELD_MEMORY_TYPE, MapParam, Param, TagRecvInfo, context_config, load)
from p2pkv.transport.base import (Notif, Peer, PeerClosedError, TransferError, TransferHandle,
                                  TransferTimeout)
from p2pkv.transport.native import decode_message
from p2pkv.transport.control import MAX_BASELINE, Conn, ControlPlaneTransport
from p2pkv.transport.ucx.handle import WAIT_SLICE_S, Note, UcxHandle
from p2pkv.transport.ucx.request import Req, Requests
from p2pkv.transport.ucx.staged import StagedPath
from p2pkv.wire import FrameType, ProtocolError, check_message, recv_frame, send_frame

__all__ = ["UcxTransport", "describe", "INSTALL_HINT", "PATHS"]

log = logging.getLogger("p2pkv.transport.ucx")

PATHS = ("auto", "put", "staged")
# bytes per staging slot (4 slots per transport); on an H100, 256 MiB slots moved large requests 2x faster
# than 64 MiB ones (docs/benchmarks.md, ## ucx)
STAGING_CUDA, STAGING_HOST = 256 << 20, 8 << 20
_KIND_BASE, _KIND_NOTIF = 3, 7  # tag kinds; staged.py uses 4-6
MAX_NOTIFY = 1 << 20  # bytes of one notify / notification message (msgpack), as the tcp backend's
_POLL_HUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
_FEATURES = ("TAG", "RMA", "WAKEUP")


def _kernels_ready() -> bool:
    try:
        from p2pkv import kernels
        return kernels.load() is not None
    except Exception:  # noqa: BLE001 - no extension means the per-segment put path
        return False


def resolve_path(path: str, device: torch.device) -> str:
    """'auto' is `staged` for CUDA memory when p2pkv's gather/scatter kernels are built, else `put`."""
    if path not in PATHS:
        raise ValueError(f"ucx path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    return "staged" if device.type == "cuda" and _kernels_ready() else "put"


def describe() -> dict[str, Any]:
    """What the ucx backend uses on this machine (for `p2pkv doctor`): versions, the data path per memory kind,
    the progress mode, and the UCX transports a context here can use."""
    api, _ = load()
    import ucxx
    ctx = api.UCXContext(context_config(), feature_flags=tuple(getattr(api.Feature, f) for f in _FEATURES))
    tls = sorted({line.rsplit(" ", 1)[-1].split("/")[0] for line in ctx.info.splitlines() if "resource" in line})
    return {
        "ucxx": ucxx.__version__, "ucx": ".".join(map(str, api.get_ucx_version())),
        "transports": tls, "cuda_support": bool(ctx.cuda_support),
        "data_path": "one-sided, posted by the caller's thread: read = one GET per segment, write = one PUT per "
                     "segment; then a flush, and a write's notify tag message only after the flush completed",
        "host_memory": "path 'put': one zero-copy cma GET/PUT per segment (process_vm_readv/writev, done inside "
                       "the posting call); UCX_CMA_MEMORY_INVALIDATE=y keeps cma with peer-failure handling on",
        "cuda_memory": "cuda_ipc get_zcopy/put_zcopy (UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto enables GET); path "
                       "'auto' is 'staged' (gather kernel, one put per chunk, scatter kernel, on the control "
                       "plane's threads) when p2pkv's CUDA kernels load, else 'put'",
        "progress": "ucxx's blocking progress thread (epoll), woken by ucp_worker_signal after a post UCX did not "
                    "finish inline; completion is polled (ucp_request_check_status) or waited for in "
                    "sem_timedwait without the GIL",
        "error_handling": "peer failure mode (a dead peer is an error, never an abort); handles also fail on "
                          "control-socket hang-up and at the transport timeout",
        "context_settings": context_config(),
    }


class _Link:
    """The data path to one peer: its endpoint, the unpacked keys of its regions and staging, and the tag space of
    this connection (requests on it are numbered in the same order on both sides)."""

    def __init__(self, ep: Any, cid: int, initiator: bool):
        self.ep, self.handle, self.cid, self.initiator = ep, ep.handle, cid, initiator
        self.rkeys: list[int] = []
        self.bases = np.zeros(0, dtype=np.uint64)
        self.sizes = np.zeros(0, dtype=np.int64)
        self.staged, self.stage_base, self.stage_rkey, self.stage_slot = False, 0, 0, 0
        self.seq = self.base_seq = 0
        self.lock = threading.Lock()
        self.closed = False
        self.outbox: collections.deque[Note] = collections.deque()  # messages waiting for their flush

    def _tag(self, kind: int, seq: int, chunk: int, from_initiator: bool) -> int:
        return ((self.cid & 0xFFFFFF) << 40) | (int(from_initiator) << 39) | (kind << 36) | ((seq & 0xFFFFF) << 16) \
            | (chunk & 0xFFFF)

    def tag_out(self, kind: int, seq: int, chunk: int = 0) -> int:
        """Tag of a message this side sends."""
        return self._tag(kind, seq, chunk, self.initiator)

    def tag_in(self, kind: int, seq: int, chunk: int = 0) -> int:
        """Tag of a message the peer sends."""
        return self._tag(kind, seq, chunk, not self.initiator)


class UcxTransport(StagedPath, ControlPlaneTransport):
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
                                   feature_flags=tuple(getattr(api.Feature, f) for f in _FEATURES))
        self._worker = api.UCXWorker(self._ctx)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
        self._wh = self._worker.handle
        self._addr = bytes(self._worker.address)
        self._rq = Requests(self._ucp, self._ctx.handle)
        self._inflight: list[tuple[Req, Any]] = []  # requests UCX may still write to, with their buffers
        self._inflight_lock = threading.Lock()
        self._prune_at = 64
        self._rx: collections.deque = collections.deque()  # notification receives not complete yet, in order
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
        self._worker.set_progress_thread_start_callback(torch.cuda.set_device, cb_args=(index,))
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
        link = _Link(self._worker.create_endpoint_from_worker_address(addr, True), cid, conn.initiator)
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

    def _unpack(self, link: _Link, blob: bytes) -> int:
        rk = ctypes.c_void_p()
        self._check(self._ucp.rkey_unpack(link.handle, blob, ctypes.byref(rk)), "unpacking the peer's key")
        return rk.value  # type: ignore[return-value]

    def _adopt(self, conn: Conn) -> bool:
        """A dialled connection whose transfers are one-sided needs no op thread: reads, writes and
        notifications are posted by the caller, and the bench's baseline runs in the caller's thread too."""
        link = conn.extra.get("ucx")
        return conn.initiator and link is not None and not link.staged

    def _on_disconnect(self, conn: Conn) -> None:
        link: _Link | None = conn.extra.pop("ucx", None)
        if link is not None:
            link.closed = True
            with link.lock:
                self._release(link)

    def _release(self, link: _Link) -> None:
        """Close the endpoint first (UCX then completes whatever is still in flight on it, with an error), then
        destroy the keys those operations used."""
        try:
            link.ep.close_blocking(period=1_000_000_000, max_attempts=2)
        except Exception as e:  # noqa: BLE001 - a dead peer's endpoint may refuse a clean close
            log.debug("closing a UCX endpoint: %s", e)
        for rk in link.rkeys + ([link.stage_rkey] if link.stage_rkey else []):
            self._ucp.rkey_destroy(rk)
        link.rkeys, link.stage_rkey = [], 0

    # ------------------------------------------------------------------ transfers: one-sided, posted by the caller
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

    def _post_rma(self, conn: Conn, op: Any, region: np.ndarray, local: np.ndarray, remote: np.ndarray,
                  length: np.ndarray, request_id: str | None, nbytes: int, note: bytes | None = None) -> UcxHandle:
        """Post one GET or PUT per segment (each one foreign call; with cma the bytes move inside it), one
        flush behind them, and the notify message (sent once the flush completed, by `_pump`)."""
        link: _Link | None = conn.extra.get("ucx")
        if conn.dead is not None or link is None or link.closed:
            return UcxHandle(self, conn, link, request_id, nbytes, error=PeerClosedError(
                f"connection is down ({conn.dead or 'closed'})", peer=conn.peer.name, request_id=request_id))
        ucp = self._ucp
        if self._mem == MEM_CUDA:
            self._bind_cuda()
            if op is ucp.put and len(length):
                torch.cuda.current_stream(self.device).synchronize()  # the engine's kernels wrote the source
        la = (self._bases[region] + local.astype(np.uint64)).tolist()
        ra = (link.bases[region] + remote.astype(np.uint64)).tolist()
        flush = self._rq.new()
        err: TransferError | None = None
        entry = None
        with link.lock:
            if link.closed:
                err = PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            else:
                ep, free, params, rkeys = link.handle, ucp.free, self._params, link.rkeys
                for a, b, n, r in zip(la, ra, length.tolist(), region.tolist()):
                    p = op(ep, a, n, b, rkeys[r], params[r])
                    if p is not None:
                        if p >= ERR_LAST - 100:
                            what = "posting a get" if op is ucp.get else "posting a put"
                            err = self._ucx_error(conn, p - ERR_LAST, what, request_id)
                            break
                        free(p)  # UCX releases it when it completes; the flush below covers it
                if err is None:
                    flush.posted(ucp.flush(ep, ctypes.byref(flush.param)))
                    if note is not None:
                        entry = Note(flush, note, link.tag_out(_KIND_NOTIF, 0))
                        link.outbox.append(entry)
        if err is not None:
            self._drop(conn, err)
            return UcxHandle(self, conn, link, request_id, nbytes, error=err)
        self._track(flush)
        h = UcxHandle(self, conn, link, request_id, nbytes, flush, entry)
        if entry is not None:
            self._pump(conn, link)
        return h

    def _note_body(self, message: dict[str, Any], what: str) -> bytes:
        body = msgpack.packb(dict(message), use_bin_type=True)
        if len(body) > MAX_NOTIFY:
            raise ValueError(f"{what} of {len(body)} bytes exceeds the limit of {MAX_NOTIFY}")
        return body

    def _track(self, req: Req, keep: Any = None) -> None:
        """Keep a request's memory (and its buffer) alive while UCX may still write to it; wake the progress
        thread so that a request UCX did not finish inline is progressed now, not at its next epoll timeout."""
        if not req.in_flight:
            return
        self._ucp.signal(self._wh)
        with self._inflight_lock:
            self._inflight.append((req, keep))
            if len(self._inflight) >= self._prune_at:
                self._inflight = [(r, k) for r, k in self._inflight if r.in_flight]
                self._prune_at = max(64, 2 * len(self._inflight))

    def _pump(self, conn: Conn, link: _Link | None) -> None:
        """Send the link's notes whose flush completed, in order; runs in whichever caller thread polls."""
        if link is None or not link.outbox:
            return
        sent: list[Req] = []
        with link.lock:
            while link.outbox and not link.closed:
                head = link.outbox[0]
                if head.flush is not None:
                    st = head.flush.status()
                    if st == INPROGRESS:
                        break
                    if st < 0:
                        head.error = st
                        link.outbox.popleft()
                        continue
                req = self._rq.new()
                st = req.posted(self._ucp.tag_send(link.handle, head.body, len(head.body), head.tag,
                                                   ctypes.byref(req.param)))
                head.sent = req
                link.outbox.popleft()
                if st == INPROGRESS:
                    sent.append(req)
                    self._inflight_keep(req, head.body)
        if sent:
            self._ucp.signal(self._wh)

    def _inflight_keep(self, req: Req, keep: Any) -> None:
        with self._inflight_lock:
            self._inflight.append((req, keep))

    def _head_blocker(self, link: _Link | None, note: Note) -> Req | None:
        """For a note queued behind others: the request the first of those waits for."""
        if link is None:
            return None
        with link.lock:
            for n in link.outbox:
                if n is note:
                    return None
                b = n.blocker()
                if b is not None:
                    return b
        return None

    def _why_down(self, conn: Conn, link: _Link | None, look: bool) -> str | None:
        """Why transfers on this connection can no longer complete, or None. With `look`, also whether the
        peer hung up its control connection (a dead peer's kernel closes it)."""
        if self._down:
            return "the transport was closed"
        if conn.dead is not None or link is None or link.closed:
            return f"the connection was closed ({conn.dead or 'endpoint closed'})"
        if look and _hung_up(conn.sock):
            return "the peer closed its connection or died"
        return None

    # ------------------------------------------------------------------ notifications: tag messages, probed by polls
    @property
    def send_notif_blocks(self) -> bool:  # type: ignore[override]
        """One-sided connections only queue a message; the staged path sends it on the control plane."""
        return self.path == "staged"

    def send_notif(self, peer: Peer | str, message: dict[str, Any]) -> None:
        """Queued on the peer's endpoint behind a flush, so it reaches the peer after every byte of the writes
        posted before it (and after their notify messages); returns at once, raises only if the connection
        is already down."""
        conn = self._conn(peer)
        link: _Link | None = conn.extra.get("ucx")
        if link is not None and link.staged:
            return super().send_notif(peer, message)
        check_message(message, "notification")
        body = self._note_body(message, "notification")
        if conn.dead is not None or link is None or link.closed:
            raise PeerClosedError(f"connection is down ({conn.dead or 'closed'})", peer=conn.peer.name)
        flush = self._rq.new()
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name)
            st = flush.posted(self._ucp.flush(link.handle, ctypes.byref(flush.param)))
            if st < 0:
                raise self._ucx_error(conn, st, "flushing before a notification", None)
            link.outbox.append(Note(flush, body, link.tag_out(_KIND_NOTIF, 0)))
        self._track(flush)
        self._pump(conn, link)

    def get_notifs(self) -> list[Notif]:
        out = super().get_notifs()
        with self._lock:
            conns = list(self._out.values()) + list(self._in)
        for c in conns:
            self._pump(c, c.extra.get("ucx"))
        with self._rx_lock:
            self._receive_notifs(out)
        return out

    def _receive_notifs(self, out: list[Notif]) -> None:
        """Take every notification message UCX holds (its progress thread received them), in order."""
        ucp, wh = self._ucp, self._wh
        while self._rx and self._rx[0][0].status() != INPROGRESS:
            self._deliver(self._rx.popleft(), out)
        info = TagRecvInfo()
        while True:
            msg = ucp.tag_probe(wh, _KIND_NOTIF << 36, 7 << 36, 1, ctypes.byref(info))
            if not msg:
                return
            size = int(info.length)
            buf = ctypes.create_string_buffer(max(1, min(size, MAX_NOTIFY)))  # the limit before any allocation
            req = self._rq.new()
            req.posted(ucp.tag_msg_recv(wh, buf, len(buf), msg, ctypes.byref(req.param)))
            item = (req, buf, int(info.sender_tag), size)
            if req.in_flight:
                self._inflight_keep(req, buf)
                self._ucp.signal(wh)
            if self._rx or req.in_flight:
                self._rx.append(item)
            else:
                self._deliver(item, out)

    def _deliver(self, item: tuple[Req, Any, int, int], out: list[Notif]) -> None:
        req, buf, tag, size = item
        peer = self._notif_peers.get((tag >> 40) & 0xFFFFFF, {}).get((tag >> 39) & 1)
        st = req.status()
        if peer is None:
            log.warning("ucx: dropped a message from an endpoint no handshake named (tag %#x)", tag)
            return
        if st != 0 or size > MAX_NOTIFY:
            log.warning("ucx: dropped a %d-byte message from %s: %s", size, peer,
                        self._ucp.status_text(st) if st else f"over the limit of {MAX_NOTIFY} bytes")
            return
        n = decode_message(buf.raw[:size], peer, "ucx")
        if n is not None:
            out.append(n)

    # ------------------------------------------------------------------ the staged path (control plane, op thread)
    def _write_staged(self, conn: Conn, segments: Segments, region: np.ndarray, request_id: str | None,
                      notify: dict[str, Any] | None) -> TransferHandle:
        def run(c: Conn) -> None:
            link = self._link(c, request_id)
            seq = self._next(link)
            send_frame(c.sock, FrameType.WRITE, {"req": request_id, "segs": segments.pack("dst"), "notify": notify},
                       payload_len=segments.nbytes)
            self._staged_send(c, link, seq, region, segments.src, segments.length, request_id)
            self._expect_ack(c)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _read_staged(self, conn: Conn, segments: Segments, region: np.ndarray,
                     request_id: str | None) -> TransferHandle:
        def run(c: Conn) -> None:
            link = self._link(c, request_id)
            seq = self._next(link)
            send_frame(c.sock, FrameType.READ, {"req": request_id, "segs": segments.pack("src")},
                       payload_len=segments.nbytes)
            self._expect_ack(c)
            self._staged_recv(c, link, seq, region, segments.dst, segments.length, request_id)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a READ on a staged connection (put connections are read one-sided, never served)."""
        link = self._link(conn, request_id)
        if not link.staged:
            raise ProtocolError("READ frame on a connection whose reads are one-sided GETs")
        self._staged_send(conn, link, self._next(link), region, off, length, request_id)

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a WRITE on a staged connection."""
        link = self._link(conn, request_id)
        if not link.staged:
            raise ProtocolError("WRITE frame on a connection whose writes are one-sided PUTs")
        self._staged_recv(conn, link, self._next(link), region, off, length, request_id)

    def _next(self, link: _Link) -> int:
        link.seq += 1
        return link.seq

    def _link(self, conn: Conn, request_id: Any) -> _Link:
        link = conn.extra.get("ucx")
        if link is None or link.closed:
            raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
        return link

    def _put_one(self, conn: Conn, link: _Link, local: int, nbytes: int, remote: int, rkey: int, param: Any,
                 request_id: Any) -> None:
        """One put of a contiguous range, flushed (the staged path's per-chunk step)."""
        flush = self._rq.new()
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            p = self._ucp.put(link.handle, local, nbytes, remote, rkey, param)
            if p is not None:
                if p >= ERR_LAST - 100:
                    raise self._ucx_error(conn, p - ERR_LAST, "posting a put", request_id)
                self._ucp.free(p)
            flush.posted(self._ucp.flush(link.handle, ctypes.byref(flush.param)))
        self._wait(conn, link, flush, "flushing a put", request_id)

    def _tag_post(self, conn: Conn, link: _Link, tag: int, request_id: Any, word: int = 0) -> None:
        """Send an 8-byte control word (0: ok) and wait for local completion. The peer may already be answering
        on the control socket, so this wait never treats socket traffic as an abort."""
        buf = np.array([word], dtype="<i8")
        req = self._rq.new()
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            req.posted(self._ucp.tag_send(link.handle, buf.ctypes.data, 8, tag, ctypes.byref(req.param)))
        self._wait(conn, link, req, "sending a control message", request_id, keep=buf, watch_socket=False)

    def _tag_recv(self, conn: Conn, link: _Link, buf: np.ndarray, tag: int, request_id: Any) -> None:
        req = self._rq.new()
        req.posted(self._ucp.tag_recv(self._wh, buf.ctypes.data, buf.nbytes, tag, (1 << 64) - 1,
                                      ctypes.byref(req.param)))
        self._wait(conn, link, req, "waiting for the peer's message", request_id, keep=buf, cancel=True)

    # ------------------------------------------------------------------ waiting (staged path)
    def _wait(self, conn: Conn, link: _Link, req: Req, what: str, request_id: Any, *, keep: Any = None,
              cancel: bool = False, watch_socket: bool = True) -> None:
        """Block without the GIL until `req` completes (UCX's progress thread completes it); a UCX error, the
        link closing, `timeout` seconds without completion or (with `watch_socket`, where the peer must be
        silent) anything on the control socket turn into a TransferError naming peer and request."""
        st = req.status()
        if st == INPROGRESS:
            self._track(req, keep)
            deadline = time.monotonic() + self.timeout
            while True:
                st = req.wait(WAIT_SLICE_S)
                if st != INPROGRESS:
                    break
                abort = self._abort_reason(conn, link, time.monotonic(), deadline, watch_socket)
                if abort is not None:
                    if cancel:
                        self._ucp.cancel(self._wh, req.ptr)
                    req.wait(WAIT_SLICE_S)  # a cancelled receive completes at once; else close() keeps its memory
                    raise abort[0](f"{what}: {abort[1]}", peer=conn.peer.name, request_id=request_id)
        if st != 0:
            raise self._ucx_error(conn, st, what, request_id)

    def _abort_reason(self, conn: Conn, link: _Link, now: float, deadline: float,
                      watch_socket: bool) -> tuple[type[TransferError], str] | None:
        if link.closed or conn.dead is not None or self._down:
            return PeerClosedError, "the connection was closed"
        said = _control_interrupt(conn.sock) if watch_socket else None
        if said is not None:
            return PeerClosedError, said
        if now >= deadline:
            return TransferTimeout, f"no completion within the {self.timeout:g} s timeout"
        return None

    def _ucx_error(self, conn: Conn, status: int, what: str, request_id: Any) -> TransferError:
        text = f"UCX error while {what}: {self._ucp.status_text(status)}"
        if status in (-3, -6, -16, -24, -25) or -89 <= status <= -40:  # I/O, unreachable, canceled, not connected,
            return PeerClosedError(text, peer=conn.peer.name, request_id=request_id)  # reset, link/endpoint
        if status == -20:
            return TransferTimeout(text, peer=conn.peer.name, request_id=request_id)
        return TransferError(text, peer=conn.peer.name, request_id=request_id)

    # ------------------------------------------------------------------ baseline: one contiguous ucxx send
    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        conn = self._conn(peer)
        if conn.thread is not None:  # a staged connection: its op thread runs it
            return super().baseline(peer, nbytes, iters)
        for what, v, hi in (("nbytes", nbytes, MAX_BASELINE), ("iters", iters, 1 << 20)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= hi:
                raise ValueError(f"baseline() {what} must be an int from 1 to {hi}, got {v!r}")
        times: list[float] = []
        with conn.lock:
            for _ in range(iters):
                if conn.dead is not None:
                    raise PeerClosedError(f"connection is down ({conn.dead})", peer=conn.peer.name,
                                          request_id="baseline")
                try:
                    t0 = time.perf_counter()
                    send_frame(conn.sock, FrameType.BASELINE, {"nbytes": int(nbytes)})
                    self._expect_ack(conn)
                    self._baseline_recv(conn, int(nbytes))
                    times.append(time.perf_counter() - t0)
                except BaseException as e:  # noqa: BLE001 - reported as a TransferError, the connection dropped
                    err = self._as_transfer_error(e, conn, "baseline")
                    self._drop(conn, err)
                    raise err from None
        return min(times)

    def _baseline_buf(self, nbytes: int) -> Any:
        buf = self._baseline_bufs.get(nbytes)
        if buf is None:
            self._baseline_bufs.clear()
            if self._mem == MEM_CUDA:
                buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
            else:
                buf = np.ones(nbytes, dtype=np.uint8)
            self._baseline_bufs[nbytes] = buf
        return buf

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        link = self._link(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_send(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag_out(_KIND_BASE, link.base_seq)))
        self._wait_ucxx(conn, link, req)

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        link = self._link(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_recv(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag_in(_KIND_BASE, link.base_seq)))
        self._wait_ucxx(conn, link, req)

    def _array(self, buf: Any) -> Any:
        from ucxx._lib.arr import Array
        return Array(buf)

    def _wait_ucxx(self, conn: Conn, link: _Link, req: Any) -> None:
        """The bench's raw baseline (never a transfer's path): this thread drives progress, as a plain ucxx
        user's would, exactly as before the one-sided data path, so ratios stay comparable."""
        self._bind_cuda()
        deadline = time.monotonic() + self.timeout * 4
        while not req.completed:
            if self._ucp.progress(self._wh) == 0:
                time.sleep(0)
            if time.monotonic() > deadline or link.closed or conn.dead is not None:
                raise TransferTimeout("baseline send did not complete", peer=conn.peer.name, request_id="baseline")
        req.check_error()

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


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed (or reset) the control connection; reads nothing from it."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()  # not select(): descriptors above 1023 must work
        poller.register(fd, _POLL_HUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _control_interrupt(sock: socket.socket) -> str | None:
    """Mid-transfer the peer sends nothing on the control socket; anything there (EOF, an ERROR or CLOSE
    frame) ends the transfer. Returns why, or None while the socket is quiet."""
    try:
        poller = select.poll()  # not select(): descriptors above 1023 must work
        poller.register(sock.fileno(), select.POLLIN | _POLL_HUP)
        if not poller.poll(0):
            return None
        if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return "the peer closed its connection or died"
        f = recv_frame(sock)
    except BlockingIOError:
        return None
    except (OSError, ValueError, ProtocolError) as e:
        return f"the control connection broke ({e})"
    if f.type == FrameType.ERROR:
        return f"the peer reported: {f.meta.get('message', '?')}"
    return f"the peer sent {f.type.name} in the middle of the transfer"
