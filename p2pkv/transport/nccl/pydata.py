"""The nccl backend's Python data path, for CUDA tensors (NCCL) and TLS connections, run on
the control plane's threads: large segments go as views of the registered memory, small
ones packed into chunks (chunks.py) with a few in flight, packing and unpacking spread
over helper threads. The native gloo path (csrc/c10d) replaces all of it on plain CPU links."""
from __future__ import annotations

import datetime
import queue
import select
import threading
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport.base import PeerClosedError, TransferError, TransferHandle, TransferTimeout, off_engine_cpus
from p2pkv.transport.chunks import Packer, plan_chunks
from p2pkv.transport.conn import Conn
from p2pkv.transport.nccl.group import PairGroup
from p2pkv.wire import FrameType, send_frame

__all__ = ["PythonDataPath"]

_BASELINE_TAG = 1 << 24
_RDHUP = getattr(select, "POLLRDHUP", 0)


class _Incoming:
    """Receives posted for one transfer: the direct views' works, and the chunk ring."""

    def __init__(self, works: list[Any]):
        self.works = works
        self.packer: Packer | None = None
        self.bufs: list[torch.Tensor] = []
        self.posted: list[Any] = []
        self.workers = 1  # unpacking threads; len(bufs) is a multiple of it wherever buffers are re-posted


def _fan_out(work: Callable[[int, list[BaseException]], None], workers: int, name: str) -> None:
    """Run work(k, failed) for k in range(workers): k = 0 on this thread, the rest on helpers.
    The first exception is re-raised here; `failed` lets the others stop early."""
    failed: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k, failed)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            failed.append(e)

    def helper(k: int) -> None:
        off_engine_cpus()
        run(k)
    helpers = [threading.Thread(target=helper, args=(k,), name=name, daemon=True) for k in range(1, workers)]
    for h in helpers:
        h.start()
    run(0)
    for h in helpers:
        h.join()
    if failed:
        raise failed[0]


class PythonDataPath:
    """Mixin for NcclTransport: the control plane's data hooks (`_send_data`, `_recv_data`, the
    baseline's) and a read posted from Python, over the connection's PairGroup (conn.extra["group"])
    and its agreed (pack_threshold, chunk_bytes, depth) (conn.extra["plan"])."""

    regions: list[torch.Tensor]
    device: torch.device
    timeout: float
    recv_window_bytes: int
    pg_backend: str
    _td: Callable[[], datetime.timedelta]
    _submit: Callable[..., TransferHandle]
    _expect_ack: Callable[[Conn], Any]

    def _group(self, conn: Conn, request_id: Any) -> PairGroup:
        group = conn.extra.get("group")
        if group is None or group.pg is None:
            raise PeerClosedError("the process group to this peer is gone", peer=conn.peer.name, request_id=request_id)
        return group

    def _wait(self, conn: Conn, work: Any, request_id: Any, what: str) -> None:
        """Wait for one op within the timeout; torch's errors become TransferErrors that name peer and request."""
        try:
            work.wait(self._td())
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError/DistError for everything
            msg = str(e).split("\n")[0]
            if "imed out" in msg or "imeout" in msg:
                raise TransferTimeout(f"{what} made no progress within the {self.timeout:g} s timeout ({msg})",
                                      peer=conn.peer.name, request_id=request_id) from None
            if "closed" in msg or "reset" in msg or "crash" in msg or "abort" in msg.lower():
                raise PeerClosedError(f"{what} failed, the peer went away: {msg}", peer=conn.peer.name,
                                      request_id=request_id) from None
            raise TransferError(f"{what} failed: {msg}", peer=conn.peer.name, request_id=request_id) from None

    def _check_alive(self, conn: Conn, request_id: Any) -> None:
        """Raise if the control connection shows the peer hung up (TCP FIN/RST); reads nothing, so it works on TLS too."""
        if _RDHUP == 0:
            return
        try:
            poller = select.poll()
            poller.register(conn.sock.fileno(), _RDHUP | select.POLLHUP | select.POLLERR)
            events = poller.poll(0)
        except (OSError, ValueError) as e:
            raise PeerClosedError(f"control connection lost during the transfer: {e}", peer=conn.peer.name,
                                  request_id=request_id) from None
        if events:
            raise PeerClosedError("the peer hung up its control connection during the transfer",
                                  peer=conn.peer.name, request_id=request_id)

    def _views(self, region: np.ndarray, off: np.ndarray, length: np.ndarray, idx: np.ndarray) -> list[torch.Tensor]:
        regions = self.regions
        return [regions[r][o:o + n] for r, o, n in zip(region[idx].tolist(), off[idx].tolist(), length[idx].tolist())]

    # ------------------------------------------------------------------ sending
    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        group = self._group(conn, request_id)
        threshold, chunk_bytes, depth = conn.extra["plan"]
        direct, packed, bounds = plan_chunks(length, threshold, chunk_bytes)
        works = group.post(self._views(region, off, length, direct), recv=False)
        if len(packed):
            packer = Packer(self.regions, region, off, length, packed, bounds)
            if self.pg_backend == "gloo":
                self._send_packed_gloo(conn, group, packer, depth, request_id)
            else:
                self._send_packed(conn, group, packer, depth, request_id)
        for w in works:
            self._wait(conn, w, request_id, f"sending {len(direct)} segments")

    def _send_packed_gloo(self, conn: Conn, group: PairGroup, packer: Packer, depth: int, request_id: Any) -> None:
        """`depth` threads (this one and depth - 1 helpers) each take the next chunk, pack it into
        their own buffer and send it; gloo matches messages by tag, so chunks may go out of order.

        A gloo send is written on the thread that posts it, so while one thread writes its chunk
        another packs the next; the bytes a thread writes are the ones it just packed, still in
        its cache. Fewer hand-offs between threads than a packer feeding a poster (measured
        better on 2 cores, docs/nccl.md)."""
        count = len(packer)
        workers = max(1, min(depth, count))
        bufs = group.staging("send", workers, max(packer.sizes))
        lock = threading.Lock()
        next_chunk = [0]

        def run(b: int, failed: list[BaseException]) -> None:
            while not failed:
                with lock:
                    i = next_chunk[0]
                    next_chunk[0] += 1
                if i >= count:
                    return
                self._check_alive(conn, request_id)
                n = packer.gather(i, bufs[b])
                self._wait(conn, group.send(bufs[b][:n], i), request_id, f"sending chunk {i} of {count}")
        _fan_out(run, workers, "p2pkv-nccl-send")

    def _send_packed(self, conn: Conn, group: PairGroup, packer: Packer, depth: int, request_id: Any) -> None:
        """NCCL: this thread packs chunk i+1 while a helper thread posts chunk i and waits for
        it, in order (NCCL matches point-to-point messages by order, not by tag)."""
        bufs = group.staging("send", depth, max(packer.sizes))
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for b in range(depth):
            free.put(b)
        failed: list[BaseException] = []

        def post() -> None:
            off_engine_cpus()
            try:
                while (item := ready.get()) is not None:
                    i, b, n = item
                    self._wait(conn, group.send(bufs[b][:n], i), request_id, f"sending chunk {i} of {len(packer)}")
                    free.put(b)
            except BaseException as e:  # noqa: BLE001 - handed to the packing thread
                failed.append(e)
                free.put(None)
        poster = threading.Thread(target=post, name="p2pkv-nccl-post", daemon=True)
        poster.start()
        try:
            for i in range(len(packer)):
                b = free.get()
                if b is None:
                    break
                self._check_alive(conn, request_id)
                ready.put((i, b, packer.gather(i, bufs[b])))
        finally:
            ready.put(None)
            poster.join()
        if failed:
            raise failed[0]

    # ------------------------------------------------------------------ receiving
    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        self._finish_recvs(conn, self._post_recvs(conn, region, off, length, request_id), request_id)

    def _read_posted(self, conn: Conn, segments: Segments, request_id: str | None) -> TransferHandle:
        """A read on the connection's op thread: every receive is posted before P is asked to send."""
        def run(c: Conn) -> None:
            incoming = self._post_recvs(c, segments.region, segments.dst, segments.length, request_id)
            send_frame(c.sock, FrameType.READ, {"req": request_id, "segs": segments.pack("src")},
                       payload_len=segments.nbytes)
            self._expect_ack(c)
            self._finish_recvs(c, incoming, request_id)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _post_recvs(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray,
                    request_id: Any) -> _Incoming:
        """Post the receives of the direct segments and of the first window of chunks."""
        group = self._group(conn, request_id)
        threshold, chunk_bytes, depth = conn.extra["plan"]
        direct, packed, bounds = plan_chunks(length, threshold, chunk_bytes)
        inc = _Incoming(group.post(self._views(region, off, length, direct), recv=True))
        if len(packed):
            inc.packer = Packer(self.regions, region, off, length, packed, bounds)
            sizes = inc.packer.sizes
            window = depth if self.pg_backend == "nccl" else max(depth, self.recv_window_bytes // max(sizes))
            slots = min(len(sizes), window)
            workers = conn.extra.get("sockets", 1)
            if slots < len(sizes):  # buffers are re-posted: keep each slot's chunks on one unpacking thread
                slots = max(workers, slots - slots % workers)
            inc.workers = min(workers, slots)
            inc.bufs = group.staging("recv", slots, max(sizes))
            inc.posted = [group.recv(inc.bufs[i][:sizes[i]], i) for i in range(len(inc.bufs))]
        return inc

    def _finish_recvs(self, conn: Conn, inc: _Incoming, request_id: Any) -> None:
        """Unpack each chunk as it lands, re-posting its buffer for a later chunk; then wait for the views.

        On gloo, one thread per socket of the pair (this one and helpers) unpacks every
        `sockets`-th chunk: unpacking is most of the receiver's CPU work, and one thread doing
        all of it was the pipeline's slowest stage. Slots are a multiple of the threads, so a
        slot's chunks all belong to one thread and its re-posts need no lock."""
        group = self._group(conn, request_id)
        if inc.packer is not None:
            sizes, slots, workers = inc.packer.sizes, len(inc.bufs), inc.workers
            packer = inc.packer

            def run(k: int, failed: list[BaseException]) -> None:
                for i in range(k, len(sizes), workers):
                    if failed:
                        return
                    b = i % slots
                    self._wait(conn, inc.posted[b], request_id, f"receiving chunk {i} of {len(sizes)}")
                    packer.scatter(i, inc.bufs[b])
                    if i + slots < len(sizes):
                        inc.posted[b] = group.recv(inc.bufs[b][:sizes[i + slots]], i + slots)
                    self._check_alive(conn, request_id)
            _fan_out(run, workers, "p2pkv-nccl-unpack")
        for w in inc.works:
            self._wait(conn, w, request_id, f"receiving {len(inc.works)} segments")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # ------------------------------------------------------------------ baseline: one contiguous send
    def _baseline_buf(self, group: PairGroup, nbytes: int) -> torch.Tensor:
        if group.baseline is None or group.baseline.numel() != nbytes:
            group.baseline = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return group.baseline

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        group = self._group(conn, "baseline")
        self._wait(conn, group.send(self._baseline_buf(group, nbytes), _BASELINE_TAG), "baseline", "baseline send")

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        group = self._group(conn, "baseline")
        self._wait(conn, group.recv(self._baseline_buf(group, nbytes), _BASELINE_TAG), "baseline", "baseline recv")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
