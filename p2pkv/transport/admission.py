"""Letting peers in: dialling and accepting control connections, checking a peer's handshake info,
owning each hand-shaken connection (or one a native acceptor already serves) and remembering where
each named peer is answered."""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, Callable

from p2pkv.layout import KVCacheSpec
from p2pkv.transport.base import Connecting, Peer, PeerClosedError, TransferTimeout, off_engine_cpus
from p2pkv.transport.conn import Conn
from p2pkv.transport.gate import Connected, Gate, tell_and_close
from p2pkv.transport.net import dial, dial_back, parse_address
from p2pkv.transport.serving import serve_loop
from p2pkv.wire import HandshakeError, ProtocolError, client_handshake, pack_info, unpack_info

__all__ = ["Admission", "REPLY_KEPT"]

log = logging.getLogger("p2pkv.transport")
REPLY_KEPT = 4096  # peer names whose reply address is remembered (each connection has its own name)


class Admission:
    """Mixin for ControlPlaneTransport: the connection and admission half of the control plane."""

    name: str
    timeout: float
    auth_token: bytes | None
    local_name: str
    _address: str
    _lock: threading.Lock
    _out: dict[str, Conn]
    _in: set[Conn]
    _reply: dict[str, str]
    _closed: threading.Event
    _gate: Gate
    _hello: bytes
    _native_setup_on: bool
    _tls_client: ssl.SSLContext | None
    _check_open: Callable[[], None]
    _require_registered: Callable[[], KVCacheSpec]
    _hello_extra: Callable[[], dict[str, Any]]
    _on_connect: Callable[[Conn], None]
    _adopt: Callable[[Conn], bool]
    _op_loop: Callable[[Conn], None]
    _drop: Callable[[Conn, BaseException], None]

    # -------------------------------------------------------------- what this side says and checks
    def _configure_handshake(self) -> None:
        """Once registered (a backend calls this at the end of its `register`): what this side says in
        every handshake from now on."""
        self._hello = pack_info(self._info())
        self._gate.configure(self._hello)

    def _info(self) -> dict[str, Any]:
        return {"name": self.local_name, "backend": self.name, "spec": self._require_registered().to_dict(),
                "listen": self._address, **self._hello_extra()}

    def _check_peer(self, info: dict[str, Any]) -> None:
        if info.get("backend") != self.name:
            raise ValueError(f"backend mismatch: local {self.name!r} vs peer {info.get('backend')!r}")
        self._require_registered().check_compatible(KVCacheSpec.from_dict(info.get("spec") or {}))
        try:
            parse_address(info.get("listen"), "listen")  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"the peer's handshake announces no usable listen address ({e}); upgrade both "
                             "sides to the same p2pkv release") from None

    def _admit_info(self, raw: bytes) -> dict[str, Any]:
        """A natively hand-shaken peer's info, checked like the Python handshake checks it; HandshakeError."""
        try:
            info = unpack_info(raw)
            self._check_peer(info)
            KVCacheSpec.from_dict(info["spec"])
        except (ProtocolError, ValueError, KeyError, TypeError) as e:
            raise HandshakeError(str(e) if isinstance(e, (ProtocolError, ValueError))
                                 else f"malformed peer info ({e!r})") from None
        return info

    # -------------------------------------------------------------- dialling
    def connect(self, address: str) -> Peer:
        if not self._native_setup_on:
            return self._connect_py(address)
        c = self.connect_async(address)
        if not c.wait(self.timeout * 4):
            c.cancel()
            raise TransferTimeout("no connection within the timeout", peer=address)
        return c.result()

    def connect_async(self, address: str) -> Connecting:
        if not self._native_setup_on:
            return super().connect_async(address)  # type: ignore[misc]
        host, port, up = self._dial_target(address)
        if up is not None:
            return Connected(up)
        return self._gate.dial(address, host, port, self._hello)

    def _dial_target(self, address: str) -> tuple[str, int, Peer | None]:
        """(host, port, the peer if a live connection to `address` exists), after the checks every dial makes."""
        self._check_open()
        self._require_registered()
        host, port = parse_address(address)
        with self._lock:
            conn = self._out.get(address)
            return host, port, conn.peer if conn is not None and conn.up else None

    def _connect_py(self, address: str) -> Peer:
        """Dial and hand-shake on this thread (TLS, and backends whose set-up needs Python)."""
        host, port, up = self._dial_target(address)
        if up is not None:
            return up
        try:
            sock = dial(host, port, self.timeout)
        except socket.timeout as e:
            raise TransferTimeout(f"cannot connect: {e}", peer=address) from None
        except OSError as e:
            raise PeerClosedError(f"cannot connect: {e}", peer=address) from None
        sock.settimeout(self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self._tls_client is not None:
                sock = self._tls_client.wrap_socket(sock, server_hostname=host)
            info = client_handshake(sock, self._info(), self.auth_token, self._check_peer)
        except (OSError, ProtocolError) as e:
            sock.close()
            if isinstance(e, HandshakeError):
                raise type(e)(f"handshake with {address} failed: {e}") from None
            if isinstance(e, socket.timeout):
                raise TransferTimeout("no handshake answer within the timeout", peer=address) from None
            raise PeerClosedError(f"handshake failed: {e}", peer=address) from None
        return self._add_out(address, sock, info)

    def _dialled(self, address: str, sock: socket.socket, raw: bytes) -> Peer:
        """A natively hand-shaken connection to `address`, checked and owned in the caller's thread."""
        try:
            info = self._admit_info(raw)
        except HandshakeError as e:
            tell_and_close(sock, "handshake", str(e))
            raise HandshakeError(f"handshake with {address} failed: {e}") from None
        sock.settimeout(self.timeout)
        return self._add_out(address, sock, info)

    def _add_out(self, address: str, sock: socket.socket, info: dict[str, Any]) -> Peer:
        """Own a dialled connection whose handshake passed: its data path, its entry by address."""
        peer = Peer(f"{info.get('name', '?')}@{address}", address, KVCacheSpec.from_dict(info["spec"]), info)
        conn = Conn(sock, peer, initiator=True)
        self._remember_reply(peer, address)
        self._on_connect(conn)
        if not self._adopt(conn):
            # the op thread's socket timeout is set here, not as that thread's first step: a close()
            # right after connect() may close the socket before the thread runs (EBADF there)
            conn.sock.settimeout(self.timeout)  # type: ignore[union-attr]
            conn.thread = threading.Thread(target=self._op_loop, args=(conn,), name=f"p2pkv-{self.name}-op",
                                           daemon=True)
        with self._lock:
            old = self._out.get(address)
            self._out[address] = conn
        if old is not None:
            self._drop(old, PeerClosedError("replaced by a new connection", peer=old.peer.name))
        if conn.thread is not None:
            conn.thread.start()
        return peer

    def peers(self) -> list[Peer]:
        with self._lock:
            return [c.peer for c in self._out.values() if c.up]

    # -------------------------------------------------------------- accepting
    def _admit(self, sock: socket.socket, info: dict[str, Any], where: str) -> Conn | None:
        """Own an accepted connection whose handshake passed and hand it to the data path; the connection
        when the control plane's own Python loop must serve it, else None."""
        conn = Conn(sock, Peer(f"{info.get('name', '?')}@{where}", where, KVCacheSpec.from_dict(info["spec"]), info),
                    initiator=False)
        log.debug("%s: admitted %s from %s", self.name, conn.peer.name, where)
        self._remember_accepted(conn.peer, where)
        try:
            self._on_connect(conn)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: data path to %s failed to start: %s", self.name, conn.peer.name, e)
            conn.close()
            return None
        with self._lock:
            self._in.add(conn)
        try:
            if self._adopt(conn):
                return None
        except Exception as e:  # noqa: BLE001
            log.warning("%s: native data path to %s failed to start: %s", self.name, conn.peer.name, e)
            self._drop(conn, e)
            return None
        return conn

    def _adopt_served(self, link: Any, pid: int, raw: bytes, where: str) -> None:
        """Own a connection the native acceptor already serves: check the peer's info (a mismatch
        ends it, logged), name it for its messages, and keep it for `close()` and dead-link checks."""
        try:
            info = self._admit_info(raw)
        except HandshakeError as e:
            log.warning("%s: closed the connection from %s: %s", self.name, where, e)
            link.close()
            return
        conn = Conn(None, Peer(f"{info.get('name', '?')}@{where}", where, KVCacheSpec.from_dict(info["spec"]), info),
                    initiator=False)
        conn.link = link
        self._remember_accepted(conn.peer, where)
        self._name_served(pid, conn.peer.name)
        log.debug("%s: serving %s from %s", self.name, conn.peer.name, where)
        with self._lock:
            self._in.add(conn)
            if not self._closed.is_set():
                return
        self._drop(conn, PeerClosedError("transport closed", peer=conn.peer.name))

    def _name_served(self, pid: int, peer: str) -> None:
        """Name a natively served peer for the messages it sends (backends that serve natively)."""

    def _serve_loop(self, conn: Conn) -> None:
        off_engine_cpus()
        conn.thread = threading.current_thread()
        serve_loop(self, conn)

    def _reap(self) -> None:
        """Drop served connections whose native link ended (the peer left, or broke the protocol)."""
        with self._lock:
            ended = [c for c in self._in if not c.up and c.dead is None]
        for c in ended:
            why = c.link.reason()
            if why not in ("peer closed", "transport closed locally"):
                log.warning("%s: closed the connection from %s: %s", self.name, c.peer.name, why)
            self._drop(c, PeerClosedError(why, peer=c.peer.name))

    # -------------------------------------------------------------- reply addresses
    def reply_address(self, peer: str) -> str | None:
        with self._lock:
            return self._reply.get(peer)

    def _remember_reply(self, peer: Peer, address: str) -> None:
        """Where the peer named `peer.name` is reached: the address we dialled, or for an accepted
        peer its announced listen port at the host its connection came from."""
        with self._lock:
            self._reply.pop(peer.name, None)
            self._reply[peer.name] = address
            while len(self._reply) > REPLY_KEPT:
                del self._reply[next(iter(self._reply))]

    def _remember_accepted(self, peer: Peer, where: str) -> None:
        """An accepted peer is reached at its announced listen port on the host it came from (`where`)."""
        try:
            self._remember_reply(peer, dial_back(where, peer.info["listen"]))
        except (KeyError, ValueError) as e:
            log.warning("%s: %s cannot be answered: %s", self.name, peer.name, e)
