"""The producer (P) side: holds (a request's blocks kept until D has them), D's push
requests waiting for their hold, confirmations that overtook their save, the requests
freed without D's confirmation, and the push writes in flight. Driven only by the
engine's calls: nothing here runs on another thread. P answers and pushes to the peer a message
came from, as the transport names it (`reply_address`), never to an address in a message."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import numpy as np

from p2pkv.connector.layers import LayerMap
from p2pkv.connector.links import Links
from p2pkv.connector.messages import (Abort, Cancel, Held, HeldQuery, Landed, Release, SumQuery, Sums, ToProducer,
                                      Want)
from p2pkv.connector.records import Hold
from p2pkv.layout import plan_segments
from p2pkv.transport import PeerClosedError, TransferError, TransferHandle, Transport

__all__ = ["Producer", "GONE_KEPT"]

log = logging.getLogger("p2pkv.connector")
GONE_KEPT = 1 << 16  # holds ended without D's confirmation that the producer still recognises


class Producer:
    """P's holds and push writes; `progress(now)` polls writes and expires holds."""

    def __init__(self, transport: Transport, layers: LayerMap, links: Links, *, hold_timeout: float,
                 checksum: bool, metrics: Counter[str]):
        self.transport, self.layers, self.links = transport, layers, links
        self.hold_timeout, self.checksum, self.metrics = hold_timeout, checksum, metrics
        self.holds: dict[str, Hold] = {}
        self._held_reads = transport.holds_reads  # D's reads are served only while the transport holds them
        self._draining: dict[str, str] = {}  # ended holds whose blocks a read is still sending: how they ended
        self._stopping: list[Hold] = []  # released by the engine while writes were in flight
        self._wants: dict[str, tuple[Want, str, float]] = {}  # D's push request, where D is, until when
        self._early: dict[str, tuple[str, float]] = {}
        self._early_releases: dict[str, tuple[int, float]] = {}  # releases of a shared hold before its save
        self._gone: dict[str, None] = {}
        self._ended: set[str] = set()

    # ------------------------------------------------------------------ engine calls
    def save(self, key: str, blocks: np.ndarray, layers: set[int], ready: Callable[[], None] | None,
             final: bool | None, now: float) -> None:
        h = self.holds.get(key)
        if h is None:
            h = self.holds[key] = Hold(key, blocks, set(), now + self.hold_timeout)
            self.metrics["saved_requests"] += 1
            if self._held_reads:
                self.transport.hold(key)
        elif len(blocks) != len(h.blocks) or np.any(h.blocks != blocks):
            raise ValueError(f"request {key!r}: save() got blocks {blocks.tolist()} but earlier layers "
                             f"were saved from {h.blocks.tolist()}")
        h.saved |= layers
        if ready is not None:
            for i in layers:
                h.ready[i] = ready
        if (len(h.saved) == len(self.layers) if final is None else final) and not h.final:
            h.final, h.deadline = True, now + self.hold_timeout
            if h.pending_end is not None:
                self._end(key, h.pending_end)
        if key in self._early and len(h.saved) == len(self.layers):
            self._end(key, self._early.pop(key)[0])
        if self.holds.get(key) is h:
            self._match(key)
            self._push(h)

    def release(self, key: str) -> None:
        h = self.holds.get(key)
        if h is not None and h.inflight:
            h.stop, h.want = "released_aborted", None
            del self.holds[key]
            self._stopping.append(h)
        elif h is not None:
            self._end(key, "released_aborted", force=True)

    def busy(self) -> bool:
        return bool(self.holds or self._stopping or self._draining)

    def take_ended(self) -> set[str]:
        out, self._ended = self._ended, set()
        return out

    def progress(self, now: float) -> None:
        """Poll push writes, expire holds past `hold_timeout`, and post writes whose D is known."""
        for key in [k for k in self._draining if not self.transport.serving(k)]:
            self._count_end(key, self._draining.pop(key))
        for h in [h for h in self.holds.values() if h.writes] + self._stopping:
            self._poll_writes(h)
        for key, h in list(self.holds.items()):
            if h.final and h.deadline < now and not h.inflight:
                log.warning("request %r: D did not confirm within %.3g s; releasing its %d blocks",
                            key, self.hold_timeout, len(h.blocks))
                self._end(key, "released_timeout")
        for key in [k for k, (_, _, deadline) in self._wants.items() if deadline < now]:
            del self._wants[key]
        for key in [k for k, (_, deadline) in self._early.items() if deadline < now]:
            del self._early[key]
        for key in [k for k, (_, deadline) in self._early_releases.items() if deadline < now]:
            del self._early_releases[key]
        for key in [k for k in self._wants if k in self.holds]:
            self._match(key)
        for h in list(self.holds.values()):
            if h.want is not None and h.saved - h.written:
                self._push(h)

    # ------------------------------------------------------------------ messages from D
    def on_message(self, msg: ToProducer, sender: str | None, now: float) -> None:
        """Handle D's message; `sender` is where the transport says its sender is reached (None: unknown,
        so nothing can be answered or pushed to it)."""
        key = msg.req
        if isinstance(msg, (Release, Cancel)):
            how = "released_confirmed" if isinstance(msg, Release) else "released_aborted"
            h = self.holds.get(key)
            if isinstance(msg, Release) and msg.of > 1 and not self._last_release(key, h, msg.of, now):
                return
            if h is None:
                self._early[key] = (how, now + self.hold_timeout)
            elif h.inflight:
                h.stop, h.want = how, None
            else:
                h.want = None
                self._end(key, how)
            self._wants.pop(key, None)
        elif sender is None:
            log.warning("request %r: %s from a peer the %s transport cannot name an address for; not answered",
                        key, msg.kind, self.transport.name)
        elif isinstance(msg, Want):
            self._wants[key] = (msg, sender, now + self.hold_timeout)
            h = self.holds.get(key)
            if h is not None:
                self._match(key)
                self._push(h)
        elif isinstance(msg, HeldQuery):
            self.links.get(sender).send(Held(key, gone=key in self._gone).to_dict())
        elif isinstance(msg, SumQuery):
            blocks = np.asarray(msg.blocks, dtype=np.int64)
            if len(blocks) and (blocks.min() < 0 or blocks.max() >= self.layers.spec.num_blocks):
                log.warning("request %r: sum? for blocks %s outside this cache's %d blocks; not answered",
                            key, list(msg.blocks), self.layers.spec.num_blocks)
                return
            sums = tuple(tuple(self.layers.block_sums(blocks, layer)) for layer in range(len(self.layers)))
            self.links.get(sender).send(Sums(key, sums, gone=key in self._gone).to_dict())

    # ------------------------------------------------------------------ internals
    def _last_release(self, key: str, h: Hold | None, of: int, now: float) -> bool:
        """Count one of the `of` releases a hold shared by several D ranks waits for: True at the last."""
        if h is None:
            n, deadline = self._early_releases.pop(key, (0, now + self.hold_timeout))
            if n + 1 >= of:
                return True
            self._early_releases[key] = (n + 1, deadline)
            return False
        h.releases += 1 + self._early_releases.pop(key, (0, 0.0))[0]
        return h.releases >= of

    def _match(self, key: str) -> None:
        """Pair D's block list (push) with the hold it is for."""
        h = self.holds.get(key)
        if h is not None and h.want is None and h.stop is None and key in self._wants:
            h.want, sender, _ = self._wants.pop(key)
            h.link = self.links.get(sender)
            h.link.use()

    def _push(self, h: Hold) -> None:
        """Write the saved, unwritten layers of a hold whose D is known, once D's link is up."""
        if h.want is None or h.link is None or not h.saved - h.written:
            return
        if h.link.down:
            log.warning("request %r: cannot push to D: %s", h.key, h.link.error)
            h.want = None
            self._end(h.key, "released_error")
            return
        peer = h.link.peer
        if peer is None:
            return
        dst = np.asarray(h.want.blocks, dtype=np.int64)
        src = h.blocks[h.want.offset:][:len(dst)]
        try:
            full = plan_segments(self.layers.spec, peer.spec, src, dst[:len(src)])
        except ValueError as e:
            log.warning("request %r: cannot push to %s: %s", h.key, h.link.address, e)
            h.want = None
            self._end(h.key, "released_error")
            return
        layers = sorted(h.saved - h.written)
        h.written |= set(layers)
        h.sent_blocks = len(src)
        self.metrics["layers_pushed"] += len(layers)
        if not h.final:
            self.metrics["layers_pushed_before_final"] += len(layers)
        for layer in layers:
            fn = h.ready.pop(layer, None)
            if fn is not None:
                fn()
            sums = tuple(self.layers.block_sums(src, layer)) if self.checksum else None
            note = Landed(h.key, layer=layer, n=len(src), sums=sums, to=h.want.load).to_dict()
            try:
                x = self.transport.write(peer, self.layers.segments(full, layer), request_id=h.key, notify=note)
            except (TransferError, ValueError, OSError) as e:
                x = TransferHandle(h.link.address, h.key, 0)
                x._finish(e)
            h.writes.append(x)
        self._poll_writes(h)

    def _poll_writes(self, h: Hold) -> None:
        """Account for the push writes of `h` that ended. A hold that was stopped (D gave up, the engine
        released it, a write failed) ends only once none of its writes is in flight any more."""
        ended = [x for x in h.writes if x.done()]
        if not ended:
            return
        h.writes = [x for x in h.writes if not x.done()]
        for x in ended:
            if x.error is not None:
                log.warning("push of request %r failed: %s", h.key, x.error)
                if h.want is not None and h.link is not None:
                    h.link.send(Abort(h.key, reason=str(x.error), to=h.want.load).to_dict())
                if isinstance(x.error, PeerClosedError) and h.link is not None:
                    h.link.broken(str(x.error))
                h.want = None
                if self.holds.get(h.key) is h:
                    h.stop = h.stop or "released_error"
            else:
                self.metrics["sent_bytes"] += x.nbytes
        if h.inflight:
            return
        if self.holds.get(h.key) is not h:
            if h in self._stopping:
                self._stopping.remove(h)
                if h.stop is not None:
                    self._report_end(h.key, h.stop)
        elif h.stop is not None:
            self._end(h.key, h.stop)
        elif len(h.written) == len(self.layers):
            self._end(h.key, "released_confirmed")

    def _end(self, key: str, how: str, force: bool = False) -> None:
        """End a hold and report it, unless the producer has not made it final yet:
        then the end waits for that save."""
        h = self.holds.get(key)
        if h is not None and not h.final and not force:
            h.pending_end = h.pending_end or how
            return
        h = self.holds.pop(key, None)
        if h is None:
            return
        if how == "released_confirmed":
            self._count_sent(h)
        self._report_end(key, how)

    def _count_sent(self, h: Hold) -> None:
        """Count the blocks D confirmed: those pushed to it (their bytes were counted per
        write), or, in pull, the blocks it read from this hold."""
        if h.written:
            self.metrics["sent_blocks"] += h.sent_blocks
            return
        self.metrics["sent_blocks"] += len(h.blocks)
        self.metrics["sent_bytes"] += len(h.blocks) * self.layers.spec.bytes_per_block

    def _report_end(self, key: str, how: str) -> None:
        """Stop serving held reads of the request; report it once no read of its blocks is in flight."""
        if self._held_reads and not self.transport.unhold(key):
            self._draining[key] = how
            return
        self._count_end(key, how)

    def _count_end(self, key: str, how: str) -> None:
        """Count how a hold ended and report it saved; one that D did not confirm is remembered as gone."""
        self.metrics[how] += 1
        self._ended.add(key)
        if how != "released_confirmed":
            self._gone[key] = None
            if len(self._gone) > GONE_KEPT:
                del self._gone[next(iter(self._gone))]
