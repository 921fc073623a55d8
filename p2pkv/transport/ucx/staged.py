"""The staged data path of the ucx backend: where thousands of small per-segment
puts cost more than copying (CUDA memory, where a gather kernel runs at memory
speed and each UCX put carries microseconds of fixed cost), the side that holds
the bytes gathers a chunk of segments into a registered staging slot, PUTs it
into the peer's slot in one operation, and the peer scatters it. Two slots per
direction pipeline the chunks; GRANT / READY / FREE tag messages keep the slots
from being overwritten while in use."""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport.base import PeerClosedError, TransferError, TransferHandle, TransferTimeout
from p2pkv.transport.conn import Conn
from p2pkv.transport.ucx.handle import WAIT_SLICE_S
from p2pkv.transport.ucx.link import KIND_FREE, KIND_GRANT, KIND_READY, Link, control_interrupt, link_of
from p2pkv.transport.ucx.request import Req, Requests
from p2pkv.transport.ucx.ucp import (ERR_LAST, INPROGRESS, MEM_CUDA, OP_FIELD_MEMH, OP_FIELD_MEMORY_TYPE, MapParam,
                                     Param, Ucp)
from p2pkv.wire import FrameType, ProtocolError, send_frame

__all__ = ["StagedPath", "plan_chunks", "KIND_GRANT", "KIND_READY", "KIND_FREE"]


def plan_chunks(region: np.ndarray, off: np.ndarray, length: np.ndarray, slot: int) -> list[tuple[np.ndarray, ...]]:
    """Cut the segments (in order) into chunks of at most `slot` bytes: pieces of at most slot/8 bytes, grouped by
    the (slot - slot/8)-byte window their first byte falls in, so a chunk is 7/8 to 8/8 of a slot. Depends only
    on the lengths, so both sides cut alike; vectorised, as requests run to 10^5 segments."""
    piece = max(slot // 8, 1)
    width = max(slot - piece, 1)
    region, off, length = (np.asarray(a, dtype=np.int64) for a in (region, off, length))
    if len(length) and int(length.max()) > piece:
        reps = -(-length // piece)
        idx = np.repeat(np.arange(len(length)), reps)
        k = np.arange(len(idx)) - np.repeat(np.cumsum(reps) - reps, reps)
        region, off, length = region[idx], off[idx] + k * piece, np.minimum(length[idx] - k * piece, piece)
    if not len(length):
        return []
    starts = np.concatenate([[0], np.cumsum(length)[:-1]])
    window = starts // width
    cuts = np.flatnonzero(np.diff(window)) + 1
    bounds = np.concatenate([[0], cuts, [len(length)]])
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append((region[a:b], off[a:b], length[a:b], np.array(int(length[a:b].sum()))))
    return out


class StagedPath:
    """Mixin for UcxTransport: staging memory (4 slots: 2 to gather into, 2 for the peer to put into), its remote
    key, the source and sink loops, and the reads, writes and served requests that run them on the control
    plane's op threads."""

    device: torch.device
    regions: list[torch.Tensor]
    timeout: float
    _ucp: Ucp
    _ctx: Any
    _wh: Any
    _rq: Requests
    _mem: int
    _bases: np.ndarray
    _down: bool
    _check: Callable[[int, str], None]
    _track: Callable[..., None]
    _ucx_error: Callable[[Conn, int, str, Any], TransferError]
    _submit: Callable[..., TransferHandle]
    _expect_ack: Callable[[Conn], Any]

    def _init_staging(self, slot: int) -> None:
        self._slot = int(slot)
        dev = self.device
        self._stage = torch.empty(4 * self._slot, dtype=torch.uint8, device=dev)
        memh = ctypes.c_void_p()
        mp = MapParam(field_mask=0b10011, address=self._stage.data_ptr(), length=self._stage.numel(),
                      memory_type=self._mem)
        ucp, ctx = self._ucp, self._ctx
        self._check(ucp.mem_map(ctx.handle, ctypes.byref(mp), ctypes.byref(memh)), "mapping staging memory")
        self._stage_memh = memh.value
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        self._check(ucp.rkey_pack(ctx.handle, memh, ctypes.byref(buf), ctypes.byref(size)), "packing a key")
        self._stage_rkey_blob = ctypes.string_at(buf, size.value)
        ucp.rkey_release(buf)
        self._stage_param = ctypes.byref(Param(op_attr_mask=OP_FIELD_MEMH | OP_FIELD_MEMORY_TYPE,
                                               memory_type=self._mem, memh=memh.value))
        self._src_lock, self._sink_lock = threading.Lock(), threading.Lock()
        self._kregions: Any = None
        self._copy_stream: Any = None
        if self._mem == MEM_CUDA:
            from p2pkv import kernels
            self._kregions = kernels.Regions.of(self.regions)
            self._copy_stream = torch.cuda.Stream(device=dev)

    def _free_staging(self) -> None:
        if getattr(self, "_stage_memh", None):
            self._ucp.mem_unmap(self._ctx.handle, self._stage_memh)
            self._stage_memh = None

    def _stage_hello(self) -> list[Any] | None:
        if not getattr(self, "_stage_memh", None):
            return None
        return [self._stage.data_ptr(), self._stage_rkey_blob, self._slot]

    # ------------------------------------------------------------------ copies in and out of slots
    def _gather(self, slot: int, region: np.ndarray, off: np.ndarray, length: np.ndarray, nbytes: int) -> None:
        base = slot * self._slot
        if self._mem == MEM_CUDA:
            from p2pkv import kernels
            s = self._copy_stream
            s.wait_stream(torch.cuda.current_stream(s.device))
            kernels.gather(self._kregions, region, off, length, out=self._stage[base:base + nbytes], stream=s)
            s.synchronize()
            return
        src = (self._bases[region] + off.astype(np.uint64)).tolist()
        dst = (self._stage.data_ptr() + base + np.concatenate([[0], np.cumsum(length)[:-1]])).tolist()
        move = ctypes.memmove
        for d, a, n in zip(dst, src, length.tolist()):
            move(d, a, n)

    def _scatter(self, slot: int, region: np.ndarray, off: np.ndarray, length: np.ndarray, nbytes: int) -> None:
        base = (2 + slot) * self._slot
        if self._mem == MEM_CUDA:
            from p2pkv import kernels
            s = self._copy_stream
            kernels.scatter(self._stage[base:base + nbytes], self._kregions, region, off, length, stream=s)
            s.synchronize()
            return
        src = (self._stage.data_ptr() + base + np.concatenate([[0], np.cumsum(length)[:-1]])).tolist()
        dst = (self._bases[region] + off.astype(np.uint64)).tolist()
        move = ctypes.memmove
        for d, a, n in zip(dst, src, length.tolist()):
            move(d, a, n)

    # ------------------------------------------------------------------ the two loops
    def _staged_send(self, conn: Conn, link: Any, seq: int, region: np.ndarray, off: np.ndarray, length: np.ndarray,
                     request_id: Any) -> None:
        """Source side: gather chunk k into local slot k%2, wait until the peer's slot k%2 is ours (GRANT for the
        first chunk, FREE for later ones), put it there, flush, say READY."""
        chunks = plan_chunks(region, off, length, min(self._slot, link.stage_slot))
        if not chunks:
            return
        self._acquire(self._src_lock, conn, request_id, "the local staging slots")
        try:
            for k, (r, o, n, nb) in enumerate(chunks):
                nb = int(nb)
                s = k % 2
                self._gather(s, r, o, n, nb)
                kind, idx = (KIND_GRANT, 0) if k == 0 else (KIND_FREE, k - 2)
                if k == 0 or k >= 2:
                    self._tag_recv(conn, link, np.empty(1, "<i8"), link.tag_in(kind, seq, idx), request_id)
                remote = link.stage_base + (2 + s) * link.stage_slot
                self._put_one(conn, link, self._stage.data_ptr() + s * self._slot, nb, remote, link.stage_rkey,
                              self._stage_param, request_id)
                self._tag_post(conn, link, link.tag_out(KIND_READY, seq, k), request_id)
        finally:
            self._src_lock.release()

    def _staged_recv(self, conn: Conn, link: Any, seq: int, region: np.ndarray, off: np.ndarray, length: np.ndarray,
                     request_id: Any) -> None:
        """Sink side: own the local sink slots for the whole request (GRANT), then for each chunk wait READY,
        scatter, and hand the slot back (FREE) while more chunks are to come."""
        chunks = plan_chunks(region, off, length, min(self._slot, link.stage_slot))
        if not chunks:
            return
        self._acquire(self._sink_lock, conn, request_id, "the local receive slots")
        try:
            self._tag_post(conn, link, link.tag_out(KIND_GRANT, seq, 0), request_id)
            for k, (r, o, n, nb) in enumerate(chunks):
                self._tag_recv(conn, link, np.empty(1, "<i8"), link.tag_in(KIND_READY, seq, k), request_id)
                self._scatter(k % 2, r, o, n, int(nb))
                if k + 2 < len(chunks):
                    self._tag_post(conn, link, link.tag_out(KIND_FREE, seq, k), request_id)
        finally:
            self._sink_lock.release()

    def _acquire(self, lock: threading.Lock, conn: Conn, request_id: Any, what: str) -> None:
        if not lock.acquire(timeout=self.timeout):
            raise TransferTimeout(f"{what} stayed busy for the {self.timeout:g} s timeout",
                                  peer=conn.peer.name, request_id=request_id)

    # ------------------------------------------------------------------ requests on the control plane
    def _write_staged(self, conn: Conn, segments: Segments, region: np.ndarray, request_id: str | None,
                      notify: dict[str, Any] | None) -> TransferHandle:
        def run(c: Conn) -> None:
            link = link_of(c, request_id)
            seq = self._next(link)
            send_frame(c.sock, FrameType.WRITE, {"req": request_id, "segs": segments.pack("dst"), "notify": notify},
                       payload_len=segments.nbytes)
            self._staged_send(c, link, seq, region, segments.src, segments.length, request_id)
            self._expect_ack(c)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _read_staged(self, conn: Conn, segments: Segments, region: np.ndarray,
                     request_id: str | None) -> TransferHandle:
        def run(c: Conn) -> None:
            link = link_of(c, request_id)
            seq = self._next(link)
            send_frame(c.sock, FrameType.READ, {"req": request_id, "segs": segments.pack("src")},
                       payload_len=segments.nbytes)
            self._expect_ack(c)
            self._staged_recv(c, link, seq, region, segments.dst, segments.length, request_id)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a READ on a staged connection (put connections are read one-sided, never served)."""
        link = link_of(conn, request_id)
        if not link.staged:
            raise ProtocolError("READ frame on a connection whose reads are one-sided GETs")
        self._staged_send(conn, link, self._next(link), region, off, length, request_id)

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a WRITE on a staged connection."""
        link = link_of(conn, request_id)
        if not link.staged:
            raise ProtocolError("WRITE frame on a connection whose writes are one-sided PUTs")
        self._staged_recv(conn, link, self._next(link), region, off, length, request_id)

    def _next(self, link: Link) -> int:
        link.seq += 1
        return link.seq

    def _put_one(self, conn: Conn, link: Link, local: int, nbytes: int, remote: int, rkey: int, param: Any,
                 request_id: Any) -> None:
        """One put of a contiguous range, flushed (the staged path's per-chunk step)."""
        flush = self._rq.new()
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            p = self._ucp.put(link.handle, local, nbytes, remote, rkey, param)
            if p is not None:
                if p >= ERR_LAST - 100:
                    raise self._ucx_error(conn, p - ERR_LAST, "posting a put", request_id)
                self._ucp.free(p)
            flush.posted(self._ucp.flush(link.handle, ctypes.byref(flush.param)))
        self._wait(conn, link, flush, "flushing a put", request_id)

    def _tag_post(self, conn: Conn, link: Link, tag: int, request_id: Any, word: int = 0) -> None:
        """Send an 8-byte control word (0: ok) and wait for local completion. The peer may already be answering
        on the control socket, so this wait never treats socket traffic as an abort."""
        buf = np.array([word], dtype="<i8")
        req = self._rq.new()
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            req.posted(self._ucp.tag_send(link.handle, buf.ctypes.data, 8, tag, ctypes.byref(req.param)))
        self._wait(conn, link, req, "sending a control message", request_id, keep=buf, watch_socket=False)

    def _tag_recv(self, conn: Conn, link: Link, buf: np.ndarray, tag: int, request_id: Any) -> None:
        req = self._rq.new()
        req.posted(self._ucp.tag_recv(self._wh, buf.ctypes.data, buf.nbytes, tag, (1 << 64) - 1,
                                      ctypes.byref(req.param)))
        self._wait(conn, link, req, "waiting for the peer's message", request_id, keep=buf, cancel=True)

    # ------------------------------------------------------------------ waiting (staged path)
    def _wait(self, conn: Conn, link: Link, req: Req, what: str, request_id: Any, *, keep: Any = None,
              cancel: bool = False, watch_socket: bool = True) -> None:
        """Block without the GIL until `req` completes (UCX's progress thread completes it); a UCX error, the
        link closing, `timeout` seconds without completion or (with `watch_socket`, where the peer must be
        silent) anything on the control socket turn into a TransferError naming peer and request."""
        st = req.status()
        if st == INPROGRESS:
            self._track(req, keep)
            deadline = time.monotonic() + self.timeout
            while True:
                st = req.wait(WAIT_SLICE_S)
                if st != INPROGRESS:
                    break
                abort = self._abort_reason(conn, link, time.monotonic(), deadline, watch_socket)
                if abort is not None:
                    if cancel:
                        self._ucp.cancel(self._wh, req.ptr)
                    req.wait(WAIT_SLICE_S)  # a cancelled receive completes at once; else close() keeps its memory
                    raise abort[0](f"{what}: {abort[1]}", peer=conn.peer.name, request_id=request_id)
        if st != 0:
            raise self._ucx_error(conn, st, what, request_id)

    def _abort_reason(self, conn: Conn, link: Link, now: float, deadline: float,
                      watch_socket: bool) -> tuple[type[TransferError], str] | None:
        if link.closed or conn.dead is not None or self._down:
            return PeerClosedError, "the connection was closed"
        said = control_interrupt(conn.sock) if watch_socket else None
        if said is not None:
            return PeerClosedError, said
        if now >= deadline:
            return TransferTimeout, f"no completion within the {self.timeout:g} s timeout"
        return None
