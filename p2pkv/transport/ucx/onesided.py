"""The ucx backend's one-sided path: a transfer's GETs or PUTs, posted by the caller's thread
with one flush behind them, and the notification messages that follow a flush, sent by
whichever caller polls next and probed for by `get_notifs()`. UCX completes the requests
(inline, or in ucxx's progress thread); no Python thread runs for them."""
from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from typing import Any, Callable

import msgpack
import numpy as np
import torch

from p2pkv.transport.base import Notif, Peer, PeerClosedError, TransferError
from p2pkv.transport.conn import Conn
from p2pkv.transport.native import decode_message
from p2pkv.transport.ucx.handle import Note, UcxHandle
from p2pkv.transport.ucx.link import KIND_NOTIF, Link, hung_up
from p2pkv.transport.ucx.request import Req, Requests
from p2pkv.transport.ucx.ucp import ERR_LAST, INPROGRESS, MEM_CUDA, TagRecvInfo, Ucp
from p2pkv.wire import check_message

__all__ = ["OneSidedPath", "MAX_NOTIFY"]

log = logging.getLogger("p2pkv.transport.ucx")

MAX_NOTIFY = 1 << 20  # bytes of one notify / notification message (msgpack), as the tcp backend's


class OneSidedPath:
    """Mixin for UcxTransport: posting one-sided transfers and notifications on a connection's Link
    (conn.extra["ucx"]), keeping in-flight requests' memory alive, and receiving notifications."""

    device: torch.device
    path: str
    _ucp: Ucp
    _wh: Any
    _rq: Requests
    _mem: int
    _bases: np.ndarray
    _params: list[Any]
    _down: bool
    _lock: threading.Lock
    _out: dict[Any, Conn]
    _in: Any
    _inflight: list[tuple[Req, Any]]
    _inflight_lock: threading.Lock
    _prune_at: int
    _rx: collections.deque
    _unnamed: collections.deque
    timeout: float
    _rx_lock: threading.Lock
    _notif_peers: dict[int, dict[int, str]]
    _bind_cuda: Callable[[], None]
    _conn: Callable[[Peer | str], Conn]
    _drop: Callable[[Conn, BaseException], None]
    _ucx_error: Callable[[Conn, int, str, Any], TransferError]

    def _post_rma(self, conn: Conn, op: Any, region: np.ndarray, local: np.ndarray, remote: np.ndarray,
                  length: np.ndarray, request_id: str | None, nbytes: int, note: bytes | None = None) -> UcxHandle:
        """Post one GET or PUT per segment (each one foreign call; with cma the bytes move inside it), one
        flush behind them, and the notify message (sent once the flush completed, by `_pump`)."""
        link: Link | None = conn.extra.get("ucx")
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
                        entry = Note(flush, note, link.tag_out(KIND_NOTIF, 0))
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

    def _pump(self, conn: Conn, link: Link | None) -> None:
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

    def _head_blocker(self, link: Link | None, note: Note) -> Req | None:
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

    def _why_down(self, conn: Conn, link: Link | None, look: bool) -> str | None:
        """Why transfers on this connection can no longer complete, or None. With `look`, also whether the
        peer hung up its control connection (a dead peer's kernel closes it)."""
        if self._down:
            return "the transport was closed"
        if conn.dead is not None or link is None or link.closed:
            return f"the connection was closed ({conn.dead or 'endpoint closed'})"
        if look and hung_up(conn.sock):
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
        link: Link | None = conn.extra.get("ucx")
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
            link.outbox.append(Note(flush, body, link.tag_out(KIND_NOTIF, 0)))
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
        waiting, self._unnamed = self._unnamed, collections.deque()
        for deadline, item in waiting:
            self._deliver(item, out, deadline)
        while self._rx and self._rx[0][0].status() != INPROGRESS:
            self._deliver(self._rx.popleft(), out)
        info = TagRecvInfo()
        while True:
            msg = ucp.tag_probe(wh, KIND_NOTIF << 36, 7 << 36, 1, ctypes.byref(info))
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

    def _deliver(self, item: tuple[Req, Any, int, int], out: list[Notif], deadline: float | None = None) -> None:
        """Decode a received message for `out`. One whose sender's handshake has not ended here yet (the
        dialling side may send as soon as its own ended) waits for it, up to the timeout."""
        req, buf, tag, size = item
        peer = self._notif_peers.get((tag >> 40) & 0xFFFFFF, {}).get((tag >> 39) & 1)
        st = req.status()
        if peer is None:
            deadline = time.monotonic() + self.timeout if deadline is None else deadline
            if time.monotonic() < deadline:
                self._unnamed.append((deadline, item))
            else:
                log.warning("ucx: dropped a message from an endpoint no handshake named (tag %#x)", tag)
            return
        if st != 0 or size > MAX_NOTIFY:
            log.warning("ucx: dropped a %d-byte message from %s: %s", size, peer,
                        self._ucp.status_text(st) if st else f"over the limit of {MAX_NOTIFY} bytes")
            return
        n = decode_message(buf.raw[:size], peer, "ucx")
        if n is not None:
            out.append(n)
