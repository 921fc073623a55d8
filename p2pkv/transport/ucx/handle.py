"""Handles of the ucx backend's one-sided transfers, and the notify messages that follow
a write. A handle holds the flush posted after the transfer's GETs or PUTs (and, for a
write with notify, the message sent once that flush completed): `done()` reads their
status, `wait()` blocks without the GIL; a peer that fails, closes or stalls ends the
transfer in an error within the transport's timeout, checked whenever it is polled."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from p2pkv.transport.base import PeerClosedError, TransferError, TransferHandle, TransferTimeout, wait_seconds
from p2pkv.transport.ucx.request import Req
from p2pkv.transport.ucx.ucp import INPROGRESS

if TYPE_CHECKING:
    from p2pkv.transport.conn import Conn

__all__ = ["Note", "UcxHandle", "WAIT_SLICE_S"]

# A wait blocks in native code until the transfer completes; it wakes at least this often only to check that the
# peer is still there and the deadline has not passed (completion itself wakes it at once).
WAIT_SLICE_S = 0.1
CHECK_EVERY_S = 0.01  # done() looks at the control socket at most this often


class Note:
    """A message to send on a link once `flush` completed (all earlier GETs/PUTs on the endpoint
    reached the peer's memory); links send their notes in order."""

    __slots__ = ("flush", "body", "tag", "sent", "error")

    def __init__(self, flush: Req | None, body: bytes, tag: int):
        self.flush, self.body, self.tag = flush, body, tag
        self.sent: Req | None = None
        self.error: int | None = None

    def status(self) -> int:
        if self.error is not None:
            return self.error
        if self.sent is None:
            return INPROGRESS
        return self.sent.status()

    def blocker(self) -> Req | None:
        """The request this note waits for now: its flush, then its own send."""
        if self.sent is None:
            return self.flush if self.flush is not None and self.flush.in_flight else None
        return self.sent if self.sent.in_flight else None


class UcxHandle(TransferHandle):
    """A transfer the caller's thread posted. Nothing but the caller's own polls and waits runs
    Python for it: UCX (inline, or in ucxx's progress thread) completes the requests."""

    def __init__(self, owner: Any, conn: "Conn", link: Any, request_id: str | None, nbytes: int,
                 flush: Req | None = None, note: Note | None = None, error: BaseException | None = None):
        self._set_fields(conn.peer.name, request_id, nbytes)
        self._owner, self._conn, self._link = owner, conn, link
        self._flush, self._note = flush, note
        self._deadline = time.monotonic() + owner.timeout
        self._next_check = 0.0
        self._over = False
        self._lock = threading.Lock()
        if error is not None:
            self._end(error)

    # ------------------------------------------------------------------ polling
    def done(self) -> bool:
        return self._over or self._step()

    @property
    def error(self) -> BaseException | None:
        self.done()
        return self._error

    def _step(self) -> bool:
        """Advance from the requests' status; True once the transfer ended (well or not)."""
        flush = self._flush
        if flush is not None:
            st = flush.status()
            if st == INPROGRESS:
                return self._still_alive()
            if st < 0:
                return self._fail(self._owner._ucx_error(self._conn, st, "moving the bytes", self.request_id))
        note = self._note
        if note is not None:
            self._owner._pump(self._conn, self._link)
            st = note.status()
            if st == INPROGRESS:
                return self._still_alive()
            if st < 0:
                return self._fail(self._owner._ucx_error(self._conn, st, "sending the notify message",
                                                         self.request_id))
        self._end(None)
        return True

    def _still_alive(self) -> bool:
        """False while the transfer may still complete; else fails it (peer gone, deadline passed)."""
        now = time.monotonic()
        look = now >= self._next_check
        if look:
            self._next_check = now + CHECK_EVERY_S
        why = self._owner._why_down(self._conn, self._link, look)
        if why is not None:
            return self._fail(PeerClosedError(why, peer=self.peer, request_id=self.request_id))
        if now >= self._deadline:
            return self._fail(TransferTimeout(f"no completion within the {self._owner.timeout:g} s timeout",
                                              peer=self.peer, request_id=self.request_id))
        return False

    def _fail(self, err: TransferError) -> bool:
        """End with `err` and drop the connection: its endpoint is closed, which cancels whatever of this
        transfer is still in flight (so nothing lands in the destination afterwards) and fails the rest."""
        if self._end(err):
            self._owner._drop(self._conn, err)
        return True

    def _end(self, err: BaseException | None) -> bool:
        with self._lock:
            if self._over:
                return False
            self._error, self._over = err, True
        self._flush = self._note = None
        return True

    # ------------------------------------------------------------------ waiting
    def wait(self, timeout: float | None = None) -> None:
        t = wait_seconds(timeout)
        end = None if t is None else time.monotonic() + t
        while not self.done():
            now = time.monotonic()
            if end is not None and now >= end:
                raise TransferTimeout(f"not finished after {timeout:.3g} s", peer=self.peer, request_id=self.request_id)
            blocker = self._blocker()
            if blocker is None:
                continue  # a notify just became sendable: the next done() posts it
            left = min(WAIT_SLICE_S, max(self._deadline - now, 0.0), (end - now) if end is not None else WAIT_SLICE_S)
            blocker.wait(left)
        if self._error is not None:
            raise self._error

    def _blocker(self) -> Req | None:
        flush, note = self._flush, self._note
        if flush is not None and flush.in_flight:
            return flush
        if note is not None:
            return note.blocker() or self._owner._head_blocker(self._link, note)
        return None

    def _finish(self, error: BaseException | None = None) -> None:
        raise NotImplementedError("a ucx transfer is finished by UCX, observed by done() or wait()")
