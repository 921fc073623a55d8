"""Per-peer set-up, polled from the engine's own calls: one `Link` per peer address starts its
dial with `transport.connect_async` (native for tcp and cuda_ipc: resolve, connect and handshake
run in C++, no Python thread) and adopts the peer when a later poll finds it connected. Control
messages are posted at once where the transport's `send_notif` never blocks; where it may (TLS,
NCCL), they go out from the link's own sender thread, so a frozen peer stalls only its own link.
The engine's thread never waits on a peer here."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any

from p2pkv.transport import Peer, TransferError, Transport
from p2pkv.transport.base import Connecting, off_engine_cpus

__all__ = ["Link", "Links"]

log = logging.getLogger("p2pkv.connector")

UNDELIVERED_KEPT = 4096
SEND_ERRORS = (TransferError, OSError, ValueError, RuntimeError)


class Link:
    """One peer: `peer` once dialled, `error` once a dial failed; `use()`, `send()` and `poll()`
    never block."""

    def __init__(self, transport: Transport, address: str):
        self.transport, self.address = transport, address
        self.peer: Peer | None = None
        self.error: str | None = None
        self.dials = 0
        self.undelivered: dict[str, str] = {}
        self._connecting: Connecting | None = None
        self._waiting: deque[dict[str, Any]] = deque()  # messages for a peer not dialled yet
        self._sender: _Sender | None = None

    @property
    def up(self) -> bool:
        return self.peer is not None

    @property
    def down(self) -> bool:
        """The last dial failed (or the connection broke) and no new one is under way."""
        return self.peer is None and self.error is not None and self._connecting is None

    @property
    def setting_up(self) -> bool:
        """A dial is under way, or messages wait for one, or for the sender thread."""
        return (self._connecting is not None or bool(self._waiting)
                or (self._sender is not None and self._sender.pending()))

    def use(self) -> None:
        """A request needs this peer: dial it unless it is up or being dialled (re-dial after a failure)."""
        if self.peer is not None or self._connecting is not None:
            return
        self.error = None
        self.dials += 1
        try:
            self._connecting = self.transport.connect_async(self.address)
        except SEND_ERRORS as e:
            self._failed(e)

    def send(self, message: dict[str, Any]) -> None:
        """Send a control message to this peer without blocking the caller, in order with earlier ones
        (those for a peer still being dialled wait for the dial; a failed dial makes them undelivered)."""
        peer = self.peer
        if peer is None or self._waiting:
            self._waiting.append(message)
            self.use()
            self.poll()
            return
        self._post(peer, message)

    def poll(self) -> None:
        """Adopt a finished dial and send what waited for it."""
        c = self._connecting
        if c is not None and c.done():
            self._connecting = None
            try:
                self.peer = c.result()
                log.debug("connected to %s (%s)", self.address, self.peer.name)
            except SEND_ERRORS as e:
                self._failed(e)
        while self._waiting and (peer := self.peer) is not None:
            self._post(peer, self._waiting.popleft())

    def wait_settled(self, timeout: float | None) -> bool:
        """Block until no dial is under way (set-up only: a request waits here only for its first contact);
        the next `poll()` adopts it."""
        c = self._connecting
        return c is None or c.wait(timeout)

    def broken(self, reason: str) -> None:
        """A transfer found the connection dead: the next use re-dials."""
        self.peer, self.error = None, reason

    def close(self, timeout: float) -> None:
        """Stop dialling and the sender thread, waiting up to `timeout` for it."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._sender is not None:
            self._sender.close(timeout)

    def _post(self, peer: Peer, message: dict[str, Any]) -> None:
        """Send to `peer` as read once by the caller: the sender thread may mark the link broken meanwhile."""
        if getattr(self.transport, "send_notif_blocks", True):
            if self._sender is None:
                self._sender = _Sender(self)
            self._sender.put(peer, message)
            return
        try:
            self.transport.send_notif(peer, message)
        except SEND_ERRORS as e:
            self.send_failed(message, e)

    def _failed(self, e: BaseException) -> None:
        self.error = f"cannot reach {self.address}: {e}"
        log.info("%s", self.error)
        dropped = len(self._waiting)
        while self._waiting:
            self._undelivered(self._waiting.popleft())
        if dropped:
            log.info("dropped %d control message(s) for unreachable peer %s", dropped, self.address)

    def send_failed(self, message: dict[str, Any], e: BaseException) -> None:
        log.info("could not send %s for request %r to %s: %s", message.get("p2pkv"), message.get("req"),
                 self.address, e)
        self.broken(f"sending to {self.address} failed: {e}")

    def _undelivered(self, message: dict[str, Any]) -> None:
        """Remember, by request, a message that never left (its peer could not be dialled)."""
        self.undelivered[str(message.get("req"))] = self.error or "peer unreachable"
        while len(self.undelivered) > UNDELIVERED_KEPT:
            del self.undelivered[next(iter(self.undelivered))]


class _Sender:
    """A link's thread for transports whose `send_notif` may block (it waits for a stuck peer up to the
    timeout): the engine's thread only enqueues. It ends when idle for the transport's timeout."""

    def __init__(self, link: Link):
        self.link = link
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._closed = False

    def pending(self) -> bool:
        return self._pending > 0

    def put(self, peer: Peer, message: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending += 1
            self._q.put((peer, message))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"p2pkv-link-{self.link.address}",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout: float) -> None:
        with self._lock:
            self._closed = True
            self._q.put(None)
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(timeout, 0))

    def _run(self) -> None:
        off_engine_cpus()
        while True:
            try:
                item = self._q.get(timeout=self.link.transport.timeout)
            except queue.Empty:
                with self._lock:
                    if self._pending == 0:
                        self._thread = None
                        return
                continue
            if item is None:
                return
            peer, message = item
            try:
                self.link.transport.send_notif(peer, message)
            except SEND_ERRORS as e:
                self.link.send_failed(message, e)
            finally:
                with self._lock:
                    self._pending -= 1


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

    def poll(self) -> None:
        """Adopt finished dials and send what waited for them (every engine call does this first)."""
        for link in self._links.values():
            if link.setting_up:
                link.poll()

    def setting_up(self) -> bool:
        """Whether some link still dials, or holds messages not sent yet."""
        return any(link.setting_up for link in self._links.values())

    def close(self, timeout: float = 1.0) -> None:
        """Stop every link, waiting at most `timeout` seconds in all."""
        end = time.monotonic() + timeout
        for link in self._links.values():
            link.close(end - time.monotonic())
