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
from p2pkv.connector.records import Load, LoadFailure, ShardedLoad
from p2pkv.heads import heads_of
from p2pkv.layout import plan_segments
from p2pkv.tp import tp_reads
from p2pkv.transport import PeerClosedError, RequestGone, RequestNotHeldYet, TransferError, TransferHandle, Transport

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
        self._sharded: dict[str, ShardedLoad] = {}
        self._by_remote: dict[str, list[str]] = {}
        self._ended: dict[str, bool] = {}
        self._loaded: set[str] = set()
        self._failed: dict[str, LoadFailure] = {}

    # ------------------------------------------------------------------ engine calls
    def load(self, key: str, blocks: np.ndarray, peer: str, remote_key: str, remote_blocks: np.ndarray | None,
             remote_offset: int, now: float) -> None:
        if key in self.loads or key in self._sharded:
            raise ValueError(f"request {key!r} is already loading")
        self._start(Load(key, blocks, self.links.get(peer), remote_key, remote_blocks, remote_offset,
                         now + self.load_timeout))

    def load_sharded(self, key: str, blocks: np.ndarray, peers: list[str], remote_key: str,
                     remote_blocks: np.ndarray, remote_offset: int, now: float) -> None:
        """Pull from a P group of `len(peers)` ranks (addresses in rank order): read from each P rank
        that holds some of this rank's heads its slice of every block, and release P's ranks that no
        D rank reads (this rank answers for those whose heads it shares first)."""
        if key in self.loads or key in self._sharded:
            raise ValueError(f"request {key!r} is already loading")
        if self.mode != "pull":
            raise ValueError(f"request {key!r}: loading from a P group of {len(peers)} ranks needs pull mode")
        spec = self.layers.spec
        every = tp_reads(spec.num_kv_heads, len(peers), spec.tp_size)
        readers = {p: len({x.d_rank for x in every if x.p_rank == p}) for p in range(len(peers))}
        parts = sorted({x.p_rank for x in every if x.d_rank == spec.tp_rank})
        self._sharded[key] = ShardedLoad(key, blocks, [f"{key}@p{p}" for p in parts])
        for p in parts:
            self._start(Load(f"{key}@p{p}", blocks, self.links.get(peers[p]), remote_key, remote_blocks,
                             remote_offset, now + self.load_timeout, parent=key, release_of=readers[p]))
        for p in self._answered_by_me(len(peers)):
            if not readers[p]:
                self.links.get(peers[p]).send(Release(remote_key).to_dict())

    def _answered_by_me(self, p_tp: int) -> list[int]:
        """The P ranks this D rank speaks for when no read does: those whose lowest D rank sharing a
        head (any D rank for a latent) is this one."""
        spec = self.layers.spec
        if spec.num_kv_heads == 0:
            return list(range(p_tp)) if spec.tp_rank == 0 else []
        mine = []
        for p in range(p_tp):
            theirs = set(heads_of(spec.num_kv_heads, p_tp, p))
            first = next(r for r in range(spec.tp_size) if theirs & set(heads_of(spec.num_kv_heads, spec.tp_size, r)))
            if first == spec.tp_rank:
                mine.append(p)
        return mine

    def _start(self, ld: Load) -> None:
        self.loads[ld.key] = ld
        self._by_remote.setdefault(ld.remote_key, []).append(ld.key)
        link = ld.link
        if self.mode == "push":
            link.undelivered.pop(ld.remote_key, None)
            link.send(Want(ld.remote_key, tuple(ld.blocks.tolist()), ld.remote_offset, ld.key).to_dict())
            ld.reads = []
        else:
            link.use()
            self._post(ld)

    def discard(self, peer: str, remote_key: str) -> None:
        self.links.get(peer).send(Cancel(remote_key).to_dict())

    def discard_sharded(self, peers: list[str], remote_key: str) -> None:
        """Tell each P rank this D rank speaks for (see `load_sharded`) that no load follows."""
        for p in self._answered_by_me(len(peers)):
            self.discard(peers[p], remote_key)

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
        sharded = self._sharded.get(key)
        if sharded is not None:
            states = [self.layer_state(k, layer) for k in sharded.parts]
            return False if False in states else None if None in states else True
        ld = self.loads.get(key)
        if ld is None:
            return self._ended.get(key, False)
        return ld.done.get(layer)

    def pending(self, key: str, layer: int) -> Load | None:
        """The load (or the P rank's part of it) whose `layer` is still to land, to wait on."""
        sharded = self._sharded.get(key)
        for k in sharded.parts if sharded is not None else [key]:
            ld = self.loads.get(k)
            if ld is not None and layer not in ld.done:
                return ld
        return None

    # ------------------------------------------------------------------ messages from P
    def on_message(self, msg: ToConsumer, sender: str = "") -> None:
        """Handle P's message; `sender` (where the transport says P is reached) picks the load when P
        did not echo one and two loads share its request id."""
        keys = [k for k in self._by_remote.get(msg.req, ()) if k in self.loads]
        if not keys:
            return
        to = getattr(msg, "to", "")
        if to:  # P echoes the load D named in its Want: exact even when two P use the same request id
            if to not in keys:
                return
            ld = self.loads[to]
        else:
            ld = next((self.loads[k] for k in keys if self.loads[k].link.address == sender), self.loads[keys[0]])
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
            log.debug("request %r: read of %d segments posted to %s", ld.key, len(segs), link.peer.name)
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
            if isinstance(h.error, RequestNotHeldYet):
                ld.not_held_yet = True
                ld.closed_only = False
            elif isinstance(h.error, RequestGone):
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
        if ld.not_held_yet and ld.error is None and time.monotonic() < ld.deadline:
            ld.not_held_yet, ld.reads = False, None  # P's engine has not published the hold yet: ask again
            ld.done.clear()
            ld.handles.clear()
            return
        if ld.not_held_yet and ld.error is None:
            ld.error = f"the producer did not hold the request within the {self.load_timeout:g} s load timeout"
            ld.cause = "timeout"
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
        ask = SumQuery(ld.remote_key, tuple(ld.remote_blocks.tolist())) if self.checksum else HeldQuery(ld.remote_key)
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
        """End a load (failed blocks named, `cause` one of FAILURE_CAUSES) and tell P, unless P could
        not be reached at all; a P rank's part of a sharded load reports once every part ended."""
        self.loads.pop(ld.key, None)
        keys = self._by_remote.get(ld.remote_key, [])
        if ld.key in keys:
            keys.remove(ld.key)
        if not keys:
            self._by_remote.pop(ld.remote_key, None)
        failure = None
        if error is not None or ld.bad:
            failed = set(range(len(ld.blocks))) if error is not None else ld.bad
            missing = set(range(ld.sent, len(ld.blocks))) if ld.sent is not None else set()
            parts = [f"the producer sent only {ld.sent} of {len(ld.blocks)} blocks"] if missing else []
            if ld.bad - missing:
                parts.append(f"checksum mismatch in {len(ld.bad - missing)} block(s)")
            if error is not None:
                cause = cause or ld.cause or "transfer_error"
            else:
                cause = "checksum" if ld.bad - missing else "partial"
            failure = LoadFailure(tuple(int(ld.blocks[i]) for i in sorted(failed)),
                                  f"request {ld.key!r} from {ld.peer_address}: {error or '; '.join(parts)}", cause)
        if not tell:
            pass
        elif self.mode == "pull":
            ld.link.send(Release(ld.remote_key, ok=failure is None, of=ld.release_of).to_dict())
        elif error is not None:
            ld.link.send(Cancel(ld.remote_key).to_dict())
        sharded = self._sharded.get(ld.parent) if ld.parent is not None else None
        if sharded is None:
            self._report(ld.key, ld.blocks, failure)
            return
        self._ended[ld.key] = failure is None  # the part's layers answer layer_state of the whole
        sharded.ended[ld.key] = failure
        if len(sharded.ended) == len(sharded.parts):
            del self._sharded[sharded.key]
            failures = [f for f in sharded.ended.values() if f is not None]
            merged = None if not failures else LoadFailure(
                tuple(sorted({b for f in failures for b in f.blocks})), "; ".join(f.reason for f in failures),
                failures[0].cause)
            self._report(sharded.key, sharded.blocks, merged)

    def _report(self, key: str, blocks: np.ndarray, failure: LoadFailure | None) -> None:
        """Count a whole load's outcome and hand it to the engine's next `take_finished`."""
        if failure is None:
            self.metrics["loaded_requests"] += 1
            self.metrics["loaded_blocks"] += len(blocks)
        else:
            self._failed[key] = failure
            self.metrics["load_failures"] += 1
            self.metrics[f"load_failed_{failure.cause}"] += 1
            self.metrics["failed_blocks"] += len(failure.blocks)
            self.metrics["loaded_blocks"] += len(blocks) - len(failure.blocks)
            log.warning("load of request %r failed for %d of %d blocks: %s", key, len(failure.blocks), len(blocks),
                        failure.reason)
        self._loaded.add(key)
        self._ended[key] = failure is None
        if len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
