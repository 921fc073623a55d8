"""Where peers come in and go out for the control plane: the listener's connections are accepted
natively, and hand-shaken either natively too (no Python thread has to run for a peer to get in:
the transport admits it from whichever thread calls in first) or in a Python thread each (TLS,
and backends whose per-peer set-up needs Python). Dials likewise: a native thread, or Python."""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from p2pkv.transport.base import Connecting, Peer, PeerClosedError, TransferTimeout, off_engine_cpus
from p2pkv.wire import (AuthError, FrameType, HandshakeError, ProtocolError, decode_meta, remote_error, send_frame,
                        server_handshake)

try:
    from p2pkv import _native
except ImportError:  # tcp and cuda_ipc refuse to start without it; the others accept in Python
    _native = None  # type: ignore[assignment]

__all__ = ["Gate", "tell_and_close"]

log = logging.getLogger("p2pkv.transport")

ADMIT_AFTER_S = 0.05


class Gate:
    """The listener side of a control-plane transport `tr`, and its native dials. `tr` supplies
    `_admit_info` (check a peer's info), `_admit` (own a hand-shaken connection) and `_serve_loop`."""

    def __init__(self, tr: Any, listener: socket.socket, native: bool):
        self._tr, self._listener, self.native = tr, listener, native
        self._closed = threading.Event()
        self._acceptor = _native.Acceptor(listener.fileno(), native) if _native is not None else None
        self._thread = threading.Thread(target=self._accept_loop, name=f"p2pkv-{tr.name}-accept", daemon=True)
        self._thread.start()

    def configure(self, hello: bytes) -> None:
        """What this side says in every native handshake from now on (its packed info)."""
        if self.native:
            self._acceptor.configure(hello, self._tr.auth_token, self._tr.timeout)  # type: ignore[union-attr]

    def serve(self, *args: Any) -> None:
        """From now on a native Server takes each hand-shaken connection at once (`Acceptor.serve`'s
        arguments): peers are served while no Python of this process runs; Python adopts them later."""
        if self.native:
            self._acceptor.serve(*args)  # type: ignore[union-attr]

    def dial(self, address: str, host: str, port: int, hello: bytes) -> Connecting:
        """A native dial and handshake; the caller of `result()` checks the peer and owns the connection."""
        return _NativeConnecting(self._tr, address, _native.Dialer(host, port, hello, self._tr.auth_token,
                                                                   self._tr.timeout))

    def close(self) -> None:
        self._closed.set()
        if self._acceptor is not None:
            self._acceptor.close()
        for fn in (lambda: self._listener.shutdown(socket.SHUT_RDWR), self._listener.close):
            try:
                fn()
            except OSError:
                pass

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def take_accepted(self) -> None:
        """Admit the connections the native acceptor hand-shook (or adopt those it already serves) and
        log those it refused. An engine's
        call (`get_notifs`) takes them at once; the accept thread only those no call took within
        ADMIT_AFTER_S (an idle engine), since a Python thread of a busy engine's process may not get
        the GIL or a CPU for seconds, and what it took would wait with it. Each is taken once."""
        acc, tr = self._acceptor, self._tr
        if not self.native or acc is None:
            return
        for fd, where, raw, server, pid in acc.take_ready():
            if server is not None:
                tr._adopt_served(server, pid, raw, where)
                continue
            sock = socket.socket(fileno=fd)
            try:
                info = tr._admit_info(raw)
            except HandshakeError as e:
                log.warning("%s: refused connection from %s: %s", tr.name, where, e)
                tell_and_close(sock, "handshake", str(e))
                continue
            sock.settimeout(tr.timeout)
            conn = tr._admit(sock, info, where)
            if conn is not None:
                threading.Thread(target=tr._serve_loop, args=(conn,), name=f"p2pkv-{tr.name}-serve",
                                 daemon=True).start()
        refused, dropped = acc.take_refusals()
        for where, reason, meta in refused:
            if meta:
                reason = f"{reason}: {remote_error(_decode_or_empty(meta))}"
            log.warning("%s: refused connection from %s: %s", tr.name, where, reason)
        if dropped:
            log.warning("%s: refused %d more connections (not logged one by one)", tr.name, dropped)

    def _accept_loop(self) -> None:
        """Admits natively hand-shaken peers when no engine call did it first; otherwise accepts
        (natively where built) and hand-shakes each connection in a thread of its own."""
        off_engine_cpus()
        acc = self._acceptor
        while not self._closed.is_set():
            if acc is None:
                try:
                    sock, addr = self._listener.accept()
                except OSError:
                    return
                todo = [(sock, addr)]
            elif not acc.wait(0.5, ADMIT_AFTER_S if self.native else 0.0):
                continue
            elif self.native:
                self.take_accepted()
                continue
            else:
                todo = []
                for fd in acc.take():
                    sock = socket.socket(fileno=fd)
                    try:
                        todo.append((sock, sock.getpeername()))
                    except OSError:
                        sock.close()
                        acc.setup_done()
            for sock, addr in todo:
                threading.Thread(target=self._serve_counted, args=(sock, addr), name=f"p2pkv-{self._tr.name}-serve",
                                 daemon=True).start()

    def _serve_counted(self, sock: socket.socket, addr: Any) -> None:
        off_engine_cpus()
        try:
            conn = self._handshake(sock, addr)
        finally:
            if self._acceptor is not None:
                self._acceptor.setup_done()
        if conn is not None:
            self._tr._serve_loop(conn)

    def _handshake(self, sock: socket.socket, addr: Any) -> Any:
        """Hand-shake with an accepted peer in Python and admit it; the connection when the control
        plane's Python loop must serve it, else None."""
        tr = self._tr
        where = f"{addr[0]}:{addr[1]}"
        sock.settimeout(tr.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if tr.spec is None:
                raise HandshakeError("no KV memory registered here yet")
            if tr._tls_server is not None:
                sock = tr._tls_server.wrap_socket(sock, server_side=True)
            info = server_handshake(sock, tr._info(), tr.auth_token, tr._check_peer)
        except (OSError, ProtocolError, ValueError) as e:
            log.warning("%s: refused connection from %s: %s", tr.name, where, e)
            sock.close()
            return None
        return tr._admit(sock, info, where)


def _decode_or_empty(meta: bytes) -> dict[str, Any]:
    try:
        return decode_meta(meta)
    except ProtocolError:
        return {}


def tell_and_close(sock: socket.socket, kind: str, message: str) -> None:
    """Send the peer an ERROR frame saying why, then close (best effort: it may be gone)."""
    try:
        sock.settimeout(0.5)
        send_frame(sock, FrameType.ERROR, {"kind": kind, "message": message})
    except OSError:
        pass
    sock.close()


class Connected(Connecting):
    """A connection that was already up."""

    def __init__(self, peer: Peer):  # no thread: done at once
        self._outcome, self._ended = peer, threading.Event()
        self._ended.set()


class _NativeConnecting(Connecting):
    """A dial and handshake on a native thread (csrc/net/dial.cpp); the peer's info is checked and the
    connection owned in the thread that takes the result."""

    def __init__(self, tr: Any, address: str, dialer: Any):  # no thread of ours
        self._tr, self._address, self._dialer = tr, address, dialer
        self._outcome: Any = None
        self._ended = threading.Event()

    def done(self) -> bool:
        return self._ended.is_set() or self._dialer.done()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ended.is_set() or self._dialer.wait(-1.0 if timeout is None else max(timeout, 0.0))

    def result(self) -> Peer:
        if not self._ended.is_set():
            if not self._dialer.done():
                raise RuntimeError("result() of a connection still under way: poll done() first")
            try:
                self._outcome = self._finish(*self._dialer.take())
            except BaseException as e:  # noqa: BLE001 - kept for every later result()
                self._outcome = e
            self._ended.set()
        return super().result()

    def cancel(self) -> None:
        self._dialer.cancel()

    def _finish(self, code: str, message: str, meta: bytes, fd: int, raw: bytes) -> Peer:
        address = self._address
        if not code:
            return self._tr._dialled(address, socket.socket(fileno=fd), raw)
        if code == "timeout":
            raise TransferTimeout(message, peer=address)
        if code == "refused":
            e = remote_error(_decode_or_empty(meta))
            if isinstance(e, HandshakeError):
                raise type(e)(f"handshake with {address} failed: {e}")
            raise PeerClosedError(f"handshake failed: {e}", peer=address)
        if code in ("auth", "handshake"):
            raise (AuthError if code == "auth" else HandshakeError)(f"handshake with {address} failed: {message}")
        if code == "protocol":
            raise PeerClosedError(f"handshake failed: {message}", peer=address)
        raise PeerClosedError(message, peer=address)
