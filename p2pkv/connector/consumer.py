"""The consumer (D) side: loads (a request's local blocks being filled from a
producer), the reads they posted, and what ended since the engine last asked.
Driven only by the engine's calls: reads are posted and polled here, never
completed by a callback on another thread."""
from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np

from p2pkv.connector.layers import LayerMap
from p2pkv.connector.links import Links
from p2pkv.connector.messages import Abort, Cancel, Held, HeldQuery, Landed, Release, SumQuery, Sums, ToConsumer, Want
from p2pkv.connector.records import Load, LoadFailure
from p2pkv.layout import plan_segments
from p2pkv.transport import PeerClosedError, RequestGone, TransferError, TransferHandle, Transport

__all__ = ["Consumer", "ENDED_KEPT"]

log = logging.getLogger("p2pkv.connector")
ENDED_KEPT = 4096  # ended loads whose outcome wait_layer still answers


class Consumer:
    """D's loads in pull (D reads P's held blocks) or push (P writes into D's blocks) mode."""

    def __init__(self, transport: Transport, layers: LayerMap, links: Links, *, mode: str, checksum: bool,
                 layerwise: bool, load_timeout: float, metrics: Counter[str]):
        self.transport, self.layers, self.links = transport, layers, links
        self.mode, self.checksum, self.layerwise = mode, checksum, layerwise
        self.load_timeout, self.metrics = load_timeout, metrics
        self.loads: dict[str, Load] = {}
        self._by_remote: dict[str, str] = {}
        self._ended: dict[str, bool] = {}
        self._loaded: set[str] = set()
        self._failed: dict[str, LoadFailure] = {}

    # ------------------------------------------------------------------ engine calls
    def load(self, key: str, blocks: np.ndarray, peer: str, remote_key: str, remote_blocks: np.ndarray | None,
             remote_offset: int, now: float) -> None:
        if key in self.loads:
            raise ValueError(f"request {key!r} is already loading")
        link = self.links.get(peer)
        ld = self.loads[key] = Load(key, blocks, link, remote_key, remote_blocks, remote_offset,
                                    now + self.load_timeout)
        self._by_remote[remote_key] = key
        if self.mode == "push":
            link.undelivered.pop(remote_key, None)
            link.send(Want(remote_key, tuple(blocks.tolist()), remote_offset, self.transport.address).to_dict())
            ld.reads = []
        else:
            link.use()
            self._post(ld)

    def discard(self, peer: str, remote_key: str) -> None:
        self.links.get(peer).send(Cancel(remote_key).to_dict())

    def busy(self) -> bool:
        return bool(self.loads)

    def take_finished(self) -> tuple[set[str], dict[str, LoadFailure]]:
        out = self._loaded, self._failed
        self._loaded, self._failed = set(), {}
        return out

    def progress(self, now: float) -> None:
        """Post loads whose producer is now dialled, poll posted reads, and expire loads past `load_timeout`."""
        for ld in list(self.loads.values()):
            if ld.reads is None:
                self._post(ld)
            elif ld.reads:
                self._poll(ld)
            if self.loads.get(ld.key) is not ld:
                continue
            if self.mode == "push" and ld.remote_key in ld.link.undelivered and not ld.done:
                self._end(ld, f"cannot reach the producer: {ld.link.undelivered.pop(ld.remote_key)}", tell=False,
                          cause="unreachable")
            elif ld.deadline < now:
                # Reads still posted may land later: report only once they ended (the transport's
                # timeout bounds that), so no late byte reaches blocks the engine reused.
                if ld.error is None:
                    ld.error, ld.cause = f"not loaded within the {self.load_timeout:g} s load timeout", "timeout"
                if not ld.reads:
                    self._end(ld, ld.error)

    def layer_state(self, key: str, layer: int) -> bool | None:
        """True/False once `layer` of the load landed or failed (or the load ended); None while pending."""
        ld = self.loads.get(key)
        if ld is None:
            return self._ended.get(key, False)
        return ld.done.get(layer)

    # ------------------------------------------------------------------ messages from P
    def on_message(self, msg: ToConsumer) -> None:
        ld = self.loads.get(self._by_remote.get(msg.req, ""))
        if ld is None:
            return
        if isinstance(msg, Abort):
            self._end(ld, f"producer gave up: {msg.reason}", cause="producer_abort")
        elif isinstance(msg, Landed):
            self._landed(ld, msg)
        elif isinstance(msg, (Held, Sums)) and ld.awaiting_answer:
            if msg.gone:
                self._end(ld, "the producer had released these blocks (its hold_timeout passed or its "
                              "engine dropped the request), so what was read may be another request's KV",
                          cause="gone")
                return
            if isinstance(msg, Sums):
                for layer, theirs in enumerate(msg.sums[:len(self.layers)]):
                    mine = self.layers.block_sums(ld.blocks, layer)
                    ld.bad |= {i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b}
                self.metrics["checksum_mismatches"] += len(ld.bad)
            self._end(ld, None)

    # ------------------------------------------------------------------ internals
    def _post(self, ld: Load) -> None:
        """Pull: post the reads of a load once its producer is dialled; fail it if the dial failed."""
        link = ld.link
        if link.down:
            self._end(ld, f"cannot reach the producer: {link.error}", tell=False, cause="unreachable")
            return
        if link.peer is None:
            return
        assert ld.remote_blocks is not None and link.peer.spec is not None
        try:
            full = plan_segments(link.peer.spec, self.layers.spec, ld.remote_blocks, ld.blocks)
        except ValueError as e:
            self._end(ld, f"bad plan: {e}", cause="bad_plan")
            return
        groups = [[layer] for layer in range(len(self.layers))] if self.layerwise else [list(range(len(self.layers)))]
        ld.reads = []
        for layers in groups:
            segs = full if not self.layerwise else self.layers.segments(full, layers[0])
            try:
                h = (self.transport.read_held(link.peer, segs, request_id=ld.remote_key) if self._held_reads
                     else self.transport.read(link.peer, segs, request_id=ld.key))
            except (TransferError, ValueError, OSError) as e:
                h = TransferHandle(link.address, ld.key, 0)
                h._finish(e if isinstance(e, TransferError) else PeerClosedError(str(e), peer=link.address,
                                                                                request_id=ld.key))
            ld.reads.append((layers, h))
            for layer in layers:
                ld.handles[layer] = h
        self._poll(ld)

    def _poll(self, ld: Load) -> None:
        """Account for the reads of `ld` that ended; once all did, confirm with P or fail."""
        assert ld.reads is not None
        still = []
        for layers, h in ld.reads:
            if not h.done():
                still.append((layers, h))
                continue
            for layer in layers:
                ld.done[layer] = h.error is None
            if isinstance(h.error, RequestGone):
                ld.error = ld.error or ("the producer had released these blocks (its hold_timeout passed or its "
                                        "engine dropped the request), so nothing was read")
                ld.cause = ld.cause or "gone"
                ld.closed_only = False
            elif h.error is not None:
                ld.error = ld.error or str(h.error)
                ld.cause = ld.cause or "transfer_error"
                if isinstance(h.error, PeerClosedError):
                    ld.link.broken(str(h.error))
                else:
                    ld.closed_only = False
            else:
                self.metrics["loaded_bytes"] += h.nbytes
        ld.reads = still
        if still or ld.awaiting_answer:
            return
        if ld.error is not None and ld.closed_only and not ld.retried and time.monotonic() < ld.deadline:
            self._retry(ld)
        elif ld.error is not None:
            self._end(ld, ld.error)
        elif len(ld.done) == len(self.layers):
            self._confirm(ld)

    def _retry(self, ld: Load) -> None:
        """Every read found the connection closed (e.g. the producer restarted on the same address):
        read once more over a fresh dial. Those reads have ended, so none of their bytes can land later."""
        log.info("request %r: connection to %s was closed (%s); re-dialling and reading again",
                 ld.key, ld.peer_address, ld.error)
        self.metrics["load_retries"] += 1
        ld.retried, ld.error, ld.cause, ld.reads = True, None, None, None
        ld.done.clear()
        ld.handles.clear()
        ld.link.use()

    @property
    def _held_reads(self) -> bool:
        """Pull reads that P serves only while it holds the request: their completion means "held and
        sent", so no question follows (with checksums, P's sums answer that instead)."""
        return self.mode == "pull" and not self.checksum and self.transport.holds_reads

    def _confirm(self, ld: Load) -> None:
        """Pull: every layer was read. After held reads that is the answer, and the Release that `_end`
        sends rides one-way; otherwise ask P whether it still held the request (or, with checksums, for
        its sums, which answer that too) and report the load only on P's answer."""
        if self._held_reads:
            self._end(ld, None)
            return
        assert ld.remote_blocks is not None
        ld.awaiting_answer = True
        addr = self.transport.address
        ask = (SumQuery(ld.remote_key, tuple(ld.remote_blocks.tolist()), addr) if self.checksum
               else HeldQuery(ld.remote_key, addr))
        ld.link.send(ask.to_dict())

    def _landed(self, ld: Load, msg: Landed) -> None:
        """Push: one layer landed in our blocks (P's write carried this note)."""
        if self.mode != "push" or not 0 <= msg.layer < len(self.layers):
            return
        ld.bad |= set(range(msg.n, len(ld.blocks)))
        ld.sent = msg.n
        self.metrics["loaded_bytes"] += msg.n * self.layers.block_bytes(msg.layer)
        if msg.sums is not None:
            mine = self.layers.block_sums(ld.blocks[:len(msg.sums)], msg.layer)
            bad = {i for i, (a, b) in enumerate(zip(mine, msg.sums)) if a != b}
            self.metrics["checksum_mismatches"] += len(bad - ld.bad)
            ld.bad |= bad
        ld.done[msg.layer] = True
        if len(ld.done) == len(self.layers):
            self._end(ld, None)

    def _end(self, ld: Load, error: str | None, tell: bool = True, cause: str | None = None) -> None:
        """Report a load ended (failed blocks named, `cause` one of FAILURE_CAUSES) and tell P,
        unless P could not be reached at all."""
        self.loads.pop(ld.key, None)
        if self._by_remote.get(ld.remote_key) == ld.key:
            del self._by_remote[ld.remote_key]
        if error is None and not ld.bad:
            self.metrics["loaded_requests"] += 1
            self.metrics["loaded_blocks"] += len(ld.blocks)
        else:
            failed = set(range(len(ld.blocks))) if error is not None else ld.bad
            blocks = tuple(int(ld.blocks[i]) for i in sorted(failed))
            missing = set(range(ld.sent, len(ld.blocks))) if ld.sent is not None else set()
            parts = [f"the producer sent only {ld.sent} of {len(ld.blocks)} blocks"] if missing else []
            if ld.bad - missing:
                parts.append(f"checksum mismatch in {len(ld.bad - missing)} block(s)")
            reason = error or "; ".join(parts)
            if error is not None:
                cause = cause or ld.cause or "transfer_error"
            else:
                cause = "checksum" if ld.bad - missing else "partial"
            self._failed[ld.key] = LoadFailure(blocks, f"request {ld.key!r} from {ld.peer_address}: {reason}", cause)
            self.metrics["load_failures"] += 1
            self.metrics[f"load_failed_{cause}"] += 1
            self.metrics["failed_blocks"] += len(blocks)
            self.metrics["loaded_blocks"] += len(ld.blocks) - len(blocks)
            log.warning("load of request %r from %s failed for %d of %d blocks: %s", ld.key, ld.peer_address,
                        len(blocks), len(ld.blocks), reason)
        if not tell:
            pass
        elif self.mode == "pull":
            ld.link.send(Release(ld.remote_key, ok=error is None and not ld.bad).to_dict())
        elif error is not None:
            ld.link.send(Cancel(ld.remote_key).to_dict())
        self._loaded.add(ld.key)
        self._ended[ld.key] = ld.key not in self._failed
        if len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
