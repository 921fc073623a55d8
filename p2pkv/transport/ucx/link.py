"""One peer's connection as the ucx backend sees it: its UCX endpoint, the peer's regions and
remote keys, the tag space its messages use, and what its control socket says (hung up, or
interrupting a transfer)."""
from __future__ import annotations

import collections
import select
import socket
import threading
from typing import Any

import numpy as np

from p2pkv.transport.base import PeerClosedError
from p2pkv.transport.conn import Conn
from p2pkv.transport.ucx.handle import Note
from p2pkv.wire import FrameType, ProtocolError, recv_frame

__all__ = ["Link", "link_of", "hung_up", "control_interrupt", "KIND_BASE", "KIND_GRANT", "KIND_READY", "KIND_FREE",
           "KIND_NOTIF"]

# tag kinds: the bench's baseline, the staged path's slot hand-offs (staged.py), notification messages
KIND_BASE, KIND_GRANT, KIND_READY, KIND_FREE, KIND_NOTIF = 3, 4, 5, 6, 7
_POLL_HUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class Link:
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


def link_of(conn: Conn, request_id: Any) -> Link:
    """The connection's open Link, or PeerClosedError naming peer and request."""
    link = conn.extra.get("ucx")
    if link is None or link.closed:
        raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
    return link


def hung_up(sock: socket.socket) -> bool:
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


def control_interrupt(sock: socket.socket) -> str | None:
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
