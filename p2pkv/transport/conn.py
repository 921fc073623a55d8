"""One control connection to a peer (`Conn`): its socket, its peer, the op queue of the side that
dialled, and the native link a backend may hand it to."""
from __future__ import annotations

import queue
import socket
import threading
from typing import Any

from p2pkv.transport.base import Peer, PeerClosedError

__all__ = ["Conn", "down"]


class Conn:
    """One control connection to a peer; the dialling side owns an op queue and worker."""

    def __init__(self, sock: socket.socket | None, peer: Peer, initiator: bool):
        self.sock, self.peer, self.initiator = sock, peer, initiator
        self.dead: BaseException | None = None
        self.ops: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.extra: dict[str, Any] = {}
        self.link: Any = None  # the native data path's link, when a backend hands the connection to it
        self.lock = threading.Lock()
        self.pending = 0  # ops queued or running

    @property
    def up(self) -> bool:
        """Neither dropped here nor ended by its native link."""
        return self.dead is None and (self.link is None or self.link.alive())

    def close(self) -> None:
        if self.sock is None:  # owned by its native link from the start
            return
        for fn in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                fn()
            except OSError:
                pass


def down(conn: Conn, request_id: Any) -> PeerClosedError:
    """The error of a request on a connection already dropped, naming why it was."""
    return PeerClosedError(f"connection is down ({conn.dead})", peer=conn.peer.name, request_id=request_id)
