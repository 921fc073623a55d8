"""The control plane every socket-dialled backend shares: a listener, the handshake, one connection
per peer with an ordered op queue, and the serving loop that validates every request against the
registered regions before a single byte moves. Backends supply only how payload bytes travel.

This module holds the transport's lifecycle and its backend hooks; the halves it is built from are
admission.py (dialling, accepting, handshake checks, reply addresses), posting.py (reads, writes,
notifications, baselines), ops.py (each connection's op thread) and conn.py (`Conn`)."""
from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from abc import abstractmethod
from typing import Any, Callable

import numpy as np

from p2pkv.layout import KVCacheSpec
from p2pkv.transport.admission import Admission
from p2pkv.transport.base import Notif, PeerClosedError, Transport
from p2pkv.transport.conn import Conn
from p2pkv.transport.gate import Gate
from p2pkv.transport.net import parse_address, tls_contexts
from p2pkv.transport.ops import OpQueue
from p2pkv.transport.posting import Posting, check_baseline_args
from p2pkv.transport.serving import MAX_BASELINE, MAX_SEGMENTS, LocalRows
try:
    from p2pkv import _native
except ImportError:  # tcp and cuda_ipc refuse to start without it; the others accept in Python
    _native = None  # type: ignore[assignment]
from p2pkv.wire import FrameType, send_frame

__all__ = ["ControlPlaneTransport", "Conn", "LocalRows", "parse_address", "check_baseline_args", "MAX_BASELINE",
           "MAX_SEGMENTS"]

log = logging.getLogger("p2pkv.transport")


class ControlPlaneTransport(Admission, Posting, OpQueue, Transport):
    """A transport dialled by 'host:port': listens on loopback unless told otherwise."""

    # True: this backend's set-up of a hand-shaken peer is quick Python with no blocking I/O, so the
    # handshake runs natively and the peer is admitted by whichever thread calls in first.
    _native_setup: bool = False

    def __init__(self, *, listen: str = "127.0.0.1:0", timeout: float = 30.0, auth_token: str | bytes | None = None,
                 name: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None):
        if auth_token is None:
            auth_token = os.environ.get("P2PKV_AUTH_TOKEN") or None
        super().__init__(timeout=timeout, auth_token=auth_token, name=name)
        self._tls_server, self._tls_client = tls_contexts(tls_cert, tls_key, tls_ca)
        host, port = parse_address(listen, "listen address")
        try:
            self._listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                                  backlog=64, reuse_port=False)
        except OSError as e:
            raise OSError(e.errno, f"{self.name} transport cannot listen on {listen}: {e.strerror or e}") from None
        bound = self._listener.getsockname()
        self._address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        self._host = host
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._out: dict[str, Conn] = {}
        self._in: set[Conn] = set()
        self._notifs: collections.deque[Notif] = collections.deque()
        self._reply: dict[str, str] = {}  # peer name (a Notif's `peer`) -> that peer's listener, per its handshake
        # Peers get in without a Python thread where the handshake can run natively: not over TLS, and
        # only for backends whose per-peer set-up is quick Python in the caller's thread (`_native_setup`).
        self._native_setup_on = (_native is not None and self._native_setup and self._tls_server is None
                                 and (self.auth_token is None or not _native.hmac_available()))
        self._hello = b""
        self._gate = Gate(self, self._listener, self._native_setup_on)

    # -------------------------------------------------------------- backend hooks
    @abstractmethod
    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Send the bytes of these local segments to the peer of `conn`."""

    @abstractmethod
    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Receive the peer's bytes into these local segments."""

    def _send_plan(self, conn: Conn, rows: LocalRows, request_id: Any, head: bytes = b"") -> Callable[[], None]:
        """Prepare sending these local rows, already checked against the registered regions, and
        return the call that moves them, after the control bytes `head` (a served read's ACK). Runs
        before anything goes out, so a backend can do its set-up off the round trip, and may send
        `head` in one call with the first payload bytes."""
        def go() -> None:
            if head:
                conn.sock.sendall(head)
            self._send_data(conn, *rows.arrays(), request_id)
        return go

    def _recv_plan(self, conn: Conn, rows: LocalRows, request_id: Any) -> Callable[[], None]:
        """As `_send_plan`, for receiving into local rows: the initiator of a read prepares while its
        request travels to the peer."""
        return lambda: self._recv_data(conn, *rows.arrays(), request_id)

    def _hello_extra(self) -> dict[str, Any]:
        """Backend fields for the handshake (e.g. a rendezvous address)."""
        return {}

    def _on_connect(self, conn: Conn) -> None:
        """Set up the data path to a peer once the handshake passed."""

    def _on_disconnect(self, conn: Conn) -> None:
        """Free what the data path held for this peer."""

    def _adopt(self, conn: Conn) -> bool:
        """Hand a connection whose handshake passed to a native data path (sets `conn.link`); True
        means no Python thread of the control plane drives it from then on."""
        return False

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        raise NotImplementedError

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- lifecycle
    @property
    def address(self) -> str:
        return self._address

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise RuntimeError(f"{self.name} transport is closed; make a new one")

    def register(self, tensors: Any, spec: KVCacheSpec | None = None) -> KVCacheSpec:
        self._check_open()
        return super().register(tensors, spec)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._gate.close()
        with self._lock:
            conns = list(self._out.values()) + list(self._in)
            self._out.clear()
            self._in.clear()
        for c in conns:
            if c.initiator and c.dead is None:
                try:
                    c.sock.settimeout(0.2)
                    send_frame(c.sock, FrameType.CLOSE, {})
                except OSError:
                    pass
            self._drop(c, PeerClosedError("transport closed locally", peer=c.peer.name))
        # no thread of ours may still run when the interpreter finalizes (a daemon thread woken
        # then is torn down through C++ frames and aborts the process)
        self._gate.join(2)
        for t in [c.thread for c in conns if c.thread is not None]:
            if t is not threading.current_thread():
                t.join(timeout=2)

    def _drop(self, conn: Conn, reason: BaseException) -> None:
        if conn.dead is None:
            conn.dead = reason
            conn.close()
            if conn.link is not None:
                conn.link.close()
            try:
                self._on_disconnect(conn)
            except Exception:  # noqa: BLE001
                log.exception("freeing the data path of %s failed", conn.peer.name)
        self._fail_queued(conn)
        if conn.initiator:
            conn.ops.put(None)
        with self._lock:
            self._in.discard(conn)
