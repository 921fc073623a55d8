"""The dialling side's op queue: each connection's ops run in order on one worker thread, the
first step of an op on an idle connection in the caller's thread; every failure ends on the op's
handle as a TransferError naming the peer and the request."""
from __future__ import annotations

import queue
import socket
from typing import Any, Callable

from p2pkv.transport.base import (PeerClosedError, TransferError, TransferHandle, TransferTimeout,
                                  off_engine_cpus)
from p2pkv.transport.conn import Conn, down
from p2pkv.wire import FrameType, ProtocolError, recv_frame

__all__ = ["OpQueue"]


class OpQueue:
    """Mixin for ControlPlaneTransport: queueing ops on a connection and the worker that runs them."""

    timeout: float
    _drop: Callable[[Conn, BaseException], None]

    # False: an op's first step always waits for the worker, never runs in the caller's thread.
    _inline_requests = True

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
            h._finish(down(conn, request_id))
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

    def _op_loop(self, conn: Conn) -> None:
        off_engine_cpus()
        while True:
            item = conn.ops.get()
            if item is None:
                return
            fn, h = item
            err: TransferError | None = None
            if conn.dead is not None:
                err = down(conn, h.request_id)
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
                item[1]._finish(down(conn, item[1].request_id))
