"""The control plane every socket-dialled backend shares: a listener, the
handshake, one connection per peer with an ordered op queue, and the serving
loop that validates every request against the registered regions before a
single byte moves. Backends supply only how payload bytes travel."""
from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
from abc import abstractmethod
from typing import Any, Callable

import numpy as np

from p2pkv.layout import BlockRows, KVCacheSpec
from p2pkv.segments import Segments
from p2pkv.transport.base import (Connecting, Notif, Peer, PeerClosedError, TransferError, TransferHandle,
                                  TransferTimeout, Transport, off_engine_cpus)
from p2pkv.transport.gate import Connected, Gate, tell_and_close
from p2pkv.transport.net import dial, dial_back, parse_address, tls_contexts
from p2pkv.transport.serving import MAX_BASELINE, MAX_SEGMENTS, LocalRows, serve_loop
try:
    from p2pkv import _native
except ImportError:  # tcp and cuda_ipc refuse to start without it; the others accept in Python
    _native = None  # type: ignore[assignment]
from p2pkv.wire import (FrameType, HandshakeError, ProtocolError, check_message, check_request_id, client_handshake,
                        encode_frame, pack_info, recv_frame, send_frame, unpack_info)

__all__ = ["ControlPlaneTransport", "Conn", "LocalRows", "parse_address", "check_baseline_args", "MAX_BASELINE",
           "MAX_SEGMENTS"]

log = logging.getLogger("p2pkv.transport")
REPLY_KEPT = 4096  # peer names whose reply address is remembered (each connection has its own name)


def check_baseline_args(nbytes: Any, iters: Any) -> None:
    """ValueError unless baseline()'s byte count and iterations are ints in range."""
    for what, v, hi in (("nbytes", nbytes, MAX_BASELINE), ("iters", iters, 1 << 20)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= hi:
            raise ValueError(f"baseline() {what} must be an int from 1 to {hi}, got {v!r}")


def _encode(ftype: FrameType, meta: dict[str, Any], nbytes: int, what: str) -> bytes:
    """A request's frame, built at call entry so that one that cannot be sent is refused with a ValueError."""
    try:
        return encode_frame(ftype, meta, nbytes)
    except ProtocolError as e:
        raise ValueError(f"{what} cannot be sent: {e}") from None


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


def _down(conn: Conn, request_id: Any) -> PeerClosedError:
    return PeerClosedError(f"connection is down ({conn.dead})", peer=conn.peer.name, request_id=request_id)


class ControlPlaneTransport(Transport):
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

    # -------------------------------------------------------------- public API
    @property
    def address(self) -> str:
        return self._address

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise RuntimeError(f"{self.name} transport is closed; make a new one")

    def register(self, tensors: Any, spec: KVCacheSpec | None = None) -> KVCacheSpec:
        self._check_open()
        return super().register(tensors, spec)

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
            return super().connect_async(address)
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
            conn.sock.settimeout(self.timeout)
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

    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        conn = self._conn(peer)
        self._check_request(segments, request_id, notify)
        local_rows, nbytes, meta = self._request(conn, segments, pull=False)
        meta.update(req=request_id, notify=notify)
        frame = _encode(FrameType.WRITE, meta, nbytes, f"write request {request_id!r}")

        def run(c: Conn) -> None:
            c.sock.sendall(frame)
            self._send_plan(c, local_rows, request_id)()
            self._expect_ack(c)
        return self._submit(conn, run, request_id, nbytes)

    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        conn = self._conn(peer)
        self._check_request(segments, request_id)
        local_rows, nbytes, meta = self._request(conn, segments, pull=True)
        meta["req"] = request_id
        frame = _encode(FrameType.READ, meta, nbytes, f"read request {request_id!r}")

        def ask(c: Conn) -> None:
            c.sock.sendall(frame)

        def run(c: Conn) -> None:
            go = self._recv_plan(c, local_rows, request_id)  # while the request travels
            self._expect_ack(c)
            go()
        return self._submit(conn, run, request_id, nbytes, head=ask)

    def _request(self, conn: Conn, segments: Segments, pull: bool
                 ) -> tuple[LocalRows, int, dict[str, Any]]:
        """For a read (pull) or write: the local rows, the payload size and what the
        request's frame tells the peer. Segments planned from block ids between the two registered specs
        travel as those ids (the peer computes its rows, in the same canonical order, from its own
        geometry): a few hundred bytes instead of 24 per segment, and no table to decode and bounds-check
        on the other side. Other segments travel as the table. Either way everything is checked here,
        before anything is sent; the local rows themselves are computed later, off the round trip."""
        local = self._require_registered()
        plan = segments.plan
        rows = self._plan_rows(conn, plan, pull) if plan is not None else None
        side, other = ("dst", "src") if pull else ("src", "dst")
        if rows is not None:
            src, dst = np.asarray(plan.src_blocks, dtype=np.int64), np.asarray(plan.dst_blocks, dtype=np.int64)
            if len(src) != len(dst):
                raise ValueError(f"block id lists differ in length: {len(src)} source ids vs {len(dst)} destination ids")
            if len(src) > 1 and (src[1:] < src[:-1]).any():
                # in source order the sender reads its memory forwards (measured ~3% faster for 4 KiB rows)
                order = np.argsort(src, kind="stable")
                src, dst = src[order], dst[order]
            mine, theirs = (dst, src) if pull else (src, dst)
            rows.check_ids(mine, side)
            rows.check_ids(theirs, other)
            rows.check_regions(plan.regions)
            regions = plan.regions
            rows.check_row_limit(len(mine), regions, MAX_SEGMENTS)
            meta: dict[str, Any] = {"blocks": theirs.astype("<i8").tobytes(),
                                    "regions": None if regions is None else [int(r) for r in regions]}
            return LocalRows(blocks=(rows, mine, side, regions)), rows.nbytes(len(mine), regions), meta
        off = segments.dst if pull else segments.src
        Segments.check_bounds(segments.region.astype(np.int64), off, segments.length, [r.nbytes for r in local.regions])
        return LocalRows((segments.region, off, segments.length)), segments.nbytes, {"segs": segments.pack(other)}

    def _plan_rows(self, conn: Conn, plan: Any, pull: bool) -> BlockRows | None:
        """The block geometry of a plan between the peer's spec and ours (P's into D's), kept with the
        connection; None when the plan is between other specs."""
        src, dst = (conn.peer.spec, self.spec) if pull else (self.spec, conn.peer.spec)
        key = ("rows", pull)
        hit = conn.extra.get(key)
        if hit is not None and hit[0] is plan.src_spec and hit[1] is plan.dst_spec:
            return hit[2]
        if plan.src_spec != src or plan.dst_spec != dst:
            return None
        rows = hit[2] if hit is not None else BlockRows(src, dst)  # type: ignore[arg-type]
        conn.extra[key] = (plan.src_spec, plan.dst_spec, rows)
        return rows

    def send_notif(self, peer: Peer | str, message: dict[str, Any]) -> None:
        conn = self._conn(peer)
        check_message(message, "notification")
        frame = _encode(FrameType.NOTIF, {"msg": message}, 0, "notification")
        h = self._submit(conn, lambda c: c.sock.sendall(frame), None, 0)
        h.wait(self.timeout)

    def get_notifs(self) -> list[Notif]:
        self._gate.take_accepted()
        out = []
        while self._notifs:
            out.append(self._notifs.popleft())
        self._reap()
        return out

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

    def _reap(self) -> None:
        """Drop served connections whose native link ended (the peer left, or broke the protocol)."""
        with self._lock:
            ended = [c for c in self._in if not c.up and c.dead is None]
        for c in ended:
            why = c.link.reason()
            if why not in ("peer closed", "transport closed locally"):
                log.warning("%s: closed the connection from %s: %s", self.name, c.peer.name, why)
            self._drop(c, PeerClosedError(why, peer=c.peer.name))

    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        conn = self._conn(peer)
        check_baseline_args(nbytes, iters)
        times: list[float] = []

        def run(c: Conn) -> None:
            t0 = time.perf_counter()
            send_frame(c.sock, FrameType.BASELINE, {"nbytes": int(nbytes)})
            self._expect_ack(c)
            self._baseline_recv(c, int(nbytes))
            times.append(time.perf_counter() - t0)
        for _ in range(iters):
            self._submit(conn, run, "baseline", nbytes).wait(self.timeout * 4)
        return min(times)

    def peers(self) -> list[Peer]:
        with self._lock:
            return [c.peer for c in self._out.values() if c.up]

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

    # -------------------------------------------------------------- internals
    @staticmethod
    def _check_request(segments: Segments, request_id: str | None, notify: dict[str, Any] | None = None) -> None:
        """What every read/write checks at entry, before anything is queued (backends with their own call it too)."""
        Segments.check_given(segments)
        check_request_id(request_id)
        if notify is not None:
            check_message(notify, "notify")

    def _conn(self, peer: Peer | str) -> Conn:
        self._check_open()
        self._require_registered()
        if not isinstance(peer, (Peer, str)):
            raise TypeError(f"peer must be a Peer from connect() or its 'host:port' address, got {type(peer).__name__}")
        address = peer.address if isinstance(peer, Peer) else peer
        with self._lock:
            conn = self._out.get(address)
        if conn is None:
            if isinstance(peer, str):
                parse_address(peer)
            raise ValueError(f"not connected to {address!r}: call connect({address!r}) first")
        return conn

    def _expect_ack(self, c: Conn) -> None:
        f = recv_frame(c.sock)
        if f.type != FrameType.ACK:
            raise ProtocolError(f"expected ACK, got {f.type.name}")

    def _submit(self, conn: Conn, fn: Callable[[Conn], None], request_id: Any, nbytes: int,
                head: Callable[[Conn], None] | None = None) -> TransferHandle:
        """Queue `fn` on the connection's worker. `head`, the op's first step (sending a request
        frame), runs right here in the caller's thread when the connection is idle, so the peer
        starts on the request while the worker wakes up; otherwise the worker runs it before `fn`."""
        h = TransferHandle(conn.peer.name, request_id, nbytes)
        if conn.dead is not None:
            h._finish(_down(conn, request_id))
            return h
        failed: BaseException | None = None
        with conn.lock:
            inline = head is not None and conn.pending == 0 and conn.dead is None and self._inline_requests
            conn.pending += 1
            if inline:
                try:
                    head(conn)  # type: ignore[misc]
                except BaseException as e:  # noqa: BLE001 - reported on the handle below
                    failed = e
                else:
                    conn.ops.put((fn, h))
            elif head is not None:
                first = head

                def both(c: Conn) -> None:
                    first(c)
                    fn(c)
                conn.ops.put((both, h))
            else:
                conn.ops.put((fn, h))
        if failed is not None:
            with conn.lock:
                conn.pending -= 1
            err = self._as_transfer_error(failed, conn, request_id)
            h._finish(err)
            self._drop(conn, err)
            return h
        if conn.dead is not None:
            self._fail_queued(conn)
        return h

    _inline_requests = True

    def _op_loop(self, conn: Conn) -> None:
        off_engine_cpus()
        while True:
            item = conn.ops.get()
            if item is None:
                return
            fn, h = item
            err: TransferError | None = None
            if conn.dead is not None:
                err = _down(conn, h.request_id)
            else:
                try:
                    fn(conn)
                except BaseException as e:  # noqa: BLE001 - every failure is reported on the handle
                    err = self._as_transfer_error(e, conn, h.request_id)
            with conn.lock:
                conn.pending -= 1
            h._finish(err)
            if err is not None and conn.dead is None:
                self._drop(conn, err)

    def _as_transfer_error(self, e: BaseException, conn: Conn, request_id: Any) -> TransferError:
        if isinstance(e, TransferError):
            return e
        if isinstance(e, (socket.timeout, TimeoutError)):
            return TransferTimeout(f"no progress within the {self.timeout:g} s timeout", peer=conn.peer.name,
                                   request_id=request_id)
        if isinstance(e, ProtocolError):
            return TransferError(str(e), peer=conn.peer.name, request_id=request_id)
        if isinstance(e, OSError):
            return PeerClosedError(f"connection lost: {e}", peer=conn.peer.name, request_id=request_id)
        return TransferError(f"{type(e).__name__}: {e}", peer=conn.peer.name, request_id=request_id)

    def _fail_queued(self, conn: Conn) -> None:
        while True:
            try:
                item = conn.ops.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                with conn.lock:
                    conn.pending -= 1
                item[1]._finish(_down(conn, item[1].request_id))

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

    def setup_pending(self) -> bool:
        """Whether a peer's connection is accepted but not yet admitted (hand-shaken natively, or in a
        Python thread): the connector gives the GIL away briefly while one is (connector/core.py)."""
        return self._gate.pending() > 0

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
