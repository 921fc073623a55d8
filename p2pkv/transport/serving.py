"""The control plane's Python serving loop, for connections no native link serves (TLS, and
backends whose data moves through Python): each peer request is checked against the registered
regions before a byte moves. Also the rows a request names on this side (`LocalRows`)."""
from __future__ import annotations

import logging
import select
from typing import Any

import numpy as np

from p2pkv.layout import BlockRows, block_ids
from p2pkv.segments import Segments
from p2pkv.transport.base import Notif, PeerClosedError
from p2pkv.wire import FrameType, ProtocolError, encode_frame, recv_frame, send_frame

__all__ = ["MAX_BASELINE", "MAX_SEGMENTS", "LocalRows", "serve_loop"]

log = logging.getLogger("p2pkv.transport")

MAX_SEGMENTS = 1 << 21
MAX_BASELINE = 1 << 34


class LocalRows:
    """This side's rows of one transfer: (region, offset, length) arrays, or, for a request by block
    ids, the ids and the geometry they are computed from on demand, so a backend that only needs
    memory addresses (tcp) can go straight from ids to iovecs (`BlockRows.iovecs`)."""

    __slots__ = ("_arrays", "blocks")

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 blocks: tuple[BlockRows, np.ndarray, str, Any] | None = None):
        self._arrays, self.blocks = arrays, blocks

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            rows, ids, side, regions = self.blocks  # type: ignore[misc]
            self._arrays = rows.rows(ids, side, regions)
        return self._arrays


def serve_loop(tr: Any, conn: Any) -> None:
    """Serve a peer's requests on this Python thread (backends and TLS connections without a native path)."""
    poller = select.poll()  # not select(): descriptors above 1023 must work
    try:  # a close() racing this thread's start leaves fileno() at -1: register fails in here, not the thread
        poller.register(conn.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        while not tr._closed.is_set() and conn.dead is None:
            if not poller.poll(500):
                continue
            if not serve_one(tr, conn):
                break
    except BaseException as e:  # noqa: BLE001 - a bad peer must never take the process down
        if not tr._closed.is_set():
            log.warning("%s: closing connection from %s: %s", tr.name, conn.peer.name, e)
        tr._drop(conn, e)
        return
    tr._drop(conn, PeerClosedError("peer closed", peer=conn.peer.name))


def serve_one(tr: Any, conn: Any) -> bool:
    """Serve one frame from the peer; False once it closed the connection."""
    sock = conn.sock
    try:
        f = recv_frame(sock)
    except ConnectionResetError:
        return False
    if f.type == FrameType.CLOSE:
        return False
    if f.type == FrameType.NOTIF:
        msg = f.meta.get("msg")
        if not isinstance(msg, dict):
            raise ProtocolError("NOTIF without a message map")
        tr._notifs.append(Notif(conn.peer.name, msg))
        return True
    if f.type == FrameType.BASELINE:
        n = f.meta.get("nbytes")
        if not isinstance(n, int) or not 0 < n <= MAX_BASELINE:
            raise ProtocolError(f"bad baseline size {n!r}")
        send_frame(sock, FrameType.ACK, {})
        tr._baseline_send(conn, n)
        return True
    if f.type not in (FrameType.WRITE, FrameType.READ):
        raise ProtocolError(f"unexpected {f.type.name} frame from a connected peer")
    req = f.meta.get("req")
    raw = f.meta.get("segs")
    try:
        if "blocks" in f.meta:
            rows, total = served_rows(tr, conn, f.type == FrameType.READ, f.meta["blocks"], f.meta.get("regions"))
        elif not isinstance(raw, bytes):
            raise ValueError("segment table missing")
        else:
            region, off, length = Segments.unpack(raw, MAX_SEGMENTS)
            Segments.check_bounds(region, off, length, [r.nbytes for r in tr.spec.regions])  # type: ignore[union-attr]
            rows, total = LocalRows((region, off, length)), int(length.sum())
        if total != f.payload_len:
            raise ValueError(f"segments add up to {total} bytes but the frame announces {f.payload_len}")
    except ValueError as e:
        send_frame(sock, FrameType.ERROR, {"kind": "request", "message": f"request {req!r} refused: {e}"})
        raise ProtocolError(f"refused request {req!r}: {e}") from None
    if f.type == FrameType.WRITE:
        tr._recv_plan(conn, rows, req)()
        notify = f.meta.get("notify")
        if isinstance(notify, dict):  # visible here before the writer hears that its write is done
            tr._notifs.append(Notif(conn.peer.name, notify))
        send_frame(sock, FrameType.ACK, {})
    else:
        tr._send_plan(conn, rows, req, head=encode_frame(FrameType.ACK, {}))()
    return True



def served_rows(tr: Any, conn: Any, read: bool, blocks: Any, regions: Any) -> tuple[LocalRows, int]:
    """A peer's request by block ids: this side's rows and their byte total, every id and region
    checked first."""
    if not isinstance(blocks, bytes) or len(blocks) % 8 or len(blocks) // 8 > MAX_SEGMENTS:
        raise ValueError("block id list malformed or too long")
    if regions is not None and (not isinstance(regions, list) or not all(isinstance(r, int) for r in regions)):
        raise ValueError("region list malformed")
    key = ("served rows", read)
    rows = conn.extra.get(key)
    if rows is None:
        assert tr.spec is not None
        rows = conn.extra[key] = BlockRows(tr.spec, conn.peer.spec) if read else BlockRows(conn.peer.spec, tr.spec)
    ids = np.frombuffer(blocks, dtype="<i8")
    side = "src" if read else "dst"
    rows.check_ids(ids, side)
    if regions is not None:
        rows.check_regions(regions)
        regions = tuple(regions)
    rows.check_row_limit(len(ids), regions, MAX_SEGMENTS)
    if not read:
        block_ids(ids, "destination block", distinct=True)
    return LocalRows(blocks=(rows, ids, side, regions)), rows.nbytes(len(ids), regions)
