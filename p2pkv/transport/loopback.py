"""In-process transport for testing the layers above without sockets: peers are
other LoopbackTransport objects of the same process, found by address."""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import numpy as np

from p2pkv.segments import Segments
from p2pkv.transport.base import Notif, Peer, PeerClosedError, RequestGone, TransferHandle, Transport

__all__ = ["LoopbackTransport"]

_ids = itertools.count()
_live: "weakref.WeakValueDictionary[str, LoopbackTransport]" = weakref.WeakValueDictionary()


class LoopbackTransport(Transport):
    """`get_transport("loopback")`: copies between registered tensors of one process."""

    name = "loopback"
    send_notif_blocks = False
    holds_reads = True

    def __init__(self, *, fail_after: int | None = None, **kw: Any):
        kw.pop("listen", None)
        super().__init__(**kw)
        self._address = f"loopback://{next(_ids)}"
        self._notifs: list[Notif] = []
        self._lock = threading.Lock()
        self._closed = False
        self.fail_after = fail_after
        self._held: set[str] = set()
        _live[self._address] = self

    @property
    def address(self) -> str:
        return self._address

    def connect(self, address: str) -> Peer:
        spec = self._require_registered()
        other = _live.get(address)
        if other is None or other._closed:
            raise PeerClosedError("no live loopback transport at this address", peer=address)
        spec.check_compatible(other._require_registered())
        return Peer(f"{other.local_name}@{address}", address, other.spec)

    def _peer(self, peer: Peer | str) -> "LoopbackTransport":
        address = peer.address if isinstance(peer, Peer) else peer
        other = _live.get(address)
        if other is None or other._closed or self._closed:
            raise PeerClosedError("peer is gone", peer=address)
        return other

    def _copy(self, src: "LoopbackTransport", dst: "LoopbackTransport", segs: Segments, request_id: Any,
              peer: str) -> TransferHandle:
        h = TransferHandle(peer, request_id, segs.nbytes)
        try:
            if self.fail_after is not None:
                if self.fail_after <= 0:
                    raise PeerClosedError("injected failure", peer=peer, request_id=request_id)
                self.fail_after -= 1
            Segments.check_bounds(segs.region.astype(np.int64), segs.src, segs.length, [r.nbytes for r in src.spec.regions])
            Segments.check_bounds(segs.region.astype(np.int64), segs.dst, segs.length, [r.nbytes for r in dst.spec.regions])
            for r, s, d, n in zip(segs.region.tolist(), segs.src.tolist(), segs.dst.tolist(), segs.length.tolist()):
                dst.regions[r][d:d + n].copy_(src.regions[r][s:s + n])
        except BaseException as e:  # noqa: BLE001
            h._finish(e)
            return h
        h._finish()
        return h

    def write(self, peer, segments, request_id=None, notify=None) -> TransferHandle:
        other = self._peer(peer)
        h = self._copy(self, other, segments, request_id, other.address)
        if notify is not None and h.error is None:
            with other._lock:
                other._notifs.append(Notif(self.address, dict(notify)))
        return h

    def read(self, peer, segments, request_id=None) -> TransferHandle:
        other = self._peer(peer)
        return self._copy(other, self, segments, request_id, other.address)

    def read_held(self, peer, segments, request_id) -> TransferHandle:
        other = self._peer(peer)
        with other._lock:
            held = request_id in other._held
        if not held:
            h = TransferHandle(other.address, request_id, segments.nbytes)
            h._finish(RequestGone("the peer no longer holds this request", peer=other.address, request_id=request_id))
            return h
        return self._copy(other, self, segments, request_id, other.address)

    def hold(self, request_id: str) -> None:
        with self._lock:
            self._held.add(request_id)

    def unhold(self, request_id: str) -> bool:
        with self._lock:
            self._held.discard(request_id)
        return True  # copies finish inside read_held: none is ever in flight

    def serving(self, request_id: str) -> bool:
        return False

    def send_notif(self, peer, message) -> None:
        other = self._peer(peer)
        with other._lock:
            other._notifs.append(Notif(self.address, dict(message)))

    def reply_address(self, peer: str) -> str | None:
        """A loopback Notif's `peer` is the sending transport's own address (set here, not by the sender)."""
        return peer if peer in _live else None

    def get_notifs(self) -> list[Notif]:
        with self._lock:
            out, self._notifs = self._notifs, []
        return out

    def close(self) -> None:
        self._closed = True
        _live.pop(self._address, None)
