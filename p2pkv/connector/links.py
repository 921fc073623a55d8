"""Per-peer set-up, off the engine's thread: one `Link` per peer address dials and
hand-shakes in that peer's own short-lived thread, and sends its control messages
from there too while `transport.send_notif` may block, so a frozen peer stalls only
its own link. The engine's thread reads a link's state and enqueues (or, with a
transport whose sends never block, posts); it never waits on a peer here."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from p2pkv.transport import Peer, TransferError, Transport
from p2pkv.transport.base import off_engine_cpus

__all__ = ["Link", "Links"]

log = logging.getLogger("p2pkv.connector")

_DIAL = object()
UNDELIVERED_KEPT = 4096


class Link:
    """One peer: `peer` once dialled, `error` once a dial failed; `send()` never blocks."""

    def __init__(self, transport: Transport, address: str):
        self.transport, self.address = transport, address
        self.peer: Peer | None = None
        self.error: str | None = None
        self.dials = 0
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pending = 0  # items queued or being handled: a direct send now could overtake one
        self._settled = threading.Event()
        self._settled.set()
        self.undelivered: dict[str, str] = {}

    @property
    def up(self) -> bool:
        return self.peer is not None

    @property
    def down(self) -> bool:
        """The last dial failed (or the connection broke) and no new one is under way."""
        return self.peer is None and self.error is not None

    def use(self) -> None:
        """A request needs this peer: dial it unless it is up or being dialled (re-dial after a failure)."""
        with self._lock:
            if self.peer is None and (self.error is not None or self.dials == 0):
                self.error = None
                self.dials += 1
                self._settled.clear()
                self._put(_DIAL)

    def send(self, message: dict[str, Any]) -> None:
        """Send a control message to this peer without blocking the caller, in order with earlier ones.

        Posted at once when the link is up with nothing before it and the transport's `send_notif`
        never blocks (it says so with `send_notif_blocks = False`); else queued for the link's thread,
        which dials first if needed, since `send_notif` may wait up to the timeout for a stuck peer."""
        with self._lock:
            direct = (self.peer is not None and self._pending == 0
                      and not getattr(self.transport, "send_notif_blocks", True))
            if not direct:
                if self.peer is None:
                    self.error = None
                    self._settled.clear()
                self._put(message)
                return
            peer = self.peer
        try:
            self.transport.send_notif(peer, message)
        except (TransferError, OSError, ValueError, RuntimeError) as e:
            self._send_failed(message, e)

    def wait_settled(self, timeout: float | None) -> bool:
        """Block until no dial is under way (set-up only: a request waits here only for its first contact)."""
        return self._settled.wait(timeout)

    def broken(self, reason: str) -> None:
        """A transfer found the connection dead: the next use re-dials."""
        with self._lock:
            self.peer, self.error = None, reason

    def close(self, timeout: float) -> None:
        """Stop the link's thread, waiting up to `timeout` for it (one stuck in a dial is left to its timeout)."""
        with self._lock:
            self._closed = True
            self._put(None)
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(timeout, 0))

    def _put(self, item: Any) -> None:
        """Queue `item` for the thread (starting it if needed); call with the lock held."""
        if item is not None:
            self._pending += 1
        self._q.put(item)
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name=f"p2pkv-link-{self.address}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        off_engine_cpus()
        while True:
            try:
                item = self._q.get(timeout=self.transport.timeout)
            except queue.Empty:
                with self._lock:
                    if self._pending == 0:
                        self._thread = None
                        return
                continue
            if item is None:
                return
            try:
                self._handle(item)
            finally:
                with self._lock:
                    self._pending -= 1

    def _handle(self, item: Any) -> None:
        """Dial if needed, then send `item` (unless it only asked for the dial)."""
        if not self._dial():
            if item is not _DIAL:
                self._undelivered(item)
            self._drop_queued()
            return
        if item is _DIAL:
            return
        try:
            self.transport.send_notif(self.peer, item)  # type: ignore[arg-type]
        except (TransferError, OSError, ValueError, RuntimeError) as e:
            self._send_failed(item, e)

    def _dial(self) -> bool:
        if self.peer is not None:
            return True
        try:
            peer = self.transport.connect(self.address)
        except (TransferError, OSError, ValueError, RuntimeError) as e:
            with self._lock:
                self.error = f"cannot reach {self.address}: {e}"
                self._settled.set()
            log.info("%s", self.error)
            return False
        with self._lock:
            self.peer, self.error = peer, None
            self._settled.set()
        return True

    def _send_failed(self, message: dict[str, Any], e: BaseException) -> None:
        log.info("could not send %s for request %r to %s: %s", message.get("p2pkv"), message.get("req"),
                 self.address, e)
        self.broken(f"sending to {self.address} failed: {e}")

    def _undelivered(self, message: dict[str, Any]) -> None:
        """Remember, by request, a message that never left (its peer could not be dialled)."""
        self.undelivered[str(message.get("req"))] = self.error or "peer unreachable"
        while len(self.undelivered) > UNDELIVERED_KEPT:
            del self.undelivered[next(iter(self.undelivered))]

    def _drop_queued(self) -> None:
        """After a failed dial, drop what was queued for this peer (it would only wait for the next failure)."""
        dropped = 0
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._q.put(None)
                break
            with self._lock:
                self._pending -= 1
            if item is not _DIAL:
                dropped += 1
                self._undelivered(item)
        if dropped:
            log.info("dropped %d control message(s) for unreachable peer %s", dropped, self.address)


class Links:
    """The links of one connector, by peer address."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self._links: dict[str, Link] = {}

    def get(self, address: str) -> Link:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = Link(self.transport, address)
        return link

    def setting_up(self) -> bool:
        """Whether some link's thread has work (a dial and handshake, or queued sends) still to do."""
        return any(not link._settled.is_set() for link in self._links.values())

    def close(self, timeout: float = 1.0) -> None:
        """Stop every link's thread, waiting at most `timeout` seconds in all."""
        end = time.monotonic() + timeout
        for link in self._links.values():
            link.close(end - time.monotonic())
