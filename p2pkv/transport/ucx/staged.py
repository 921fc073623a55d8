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
from typing import Any

import numpy as np
import torch

from p2pkv.transport.ucx.ucp import MEM_CUDA, MapParam, OP_FIELD_MEMH, OP_FIELD_MEMORY_TYPE, Param
from p2pkv.transport.base import TransferTimeout
from p2pkv.transport.control import Conn

__all__ = ["StagedPath", "plan_chunks", "KIND_GRANT", "KIND_READY", "KIND_FREE"]

KIND_GRANT, KIND_READY, KIND_FREE = 4, 5, 6


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
    key, and the source and sink loops. Expects the transport's _ucp, _ctx, _mem, regions, _wait, _tag_post,
    _tag_recv and _put_one."""

    def _init_staging(self, slot: int) -> None:
        self._slot = int(slot)
        dev = self.device  # type: ignore[attr-defined]
        self._stage = torch.empty(4 * self._slot, dtype=torch.uint8, device=dev)
        memh = ctypes.c_void_p()
        mp = MapParam(field_mask=0b10011, address=self._stage.data_ptr(), length=self._stage.numel(),
                      memory_type=self._mem)  # type: ignore[attr-defined]
        ucp, ctx = self._ucp, self._ctx  # type: ignore[attr-defined]
        self._check(ucp.mem_map(ctx.handle, ctypes.byref(mp), ctypes.byref(memh)), "mapping staging memory")  # type: ignore[attr-defined]
        self._stage_memh = memh.value
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        self._check(ucp.rkey_pack(ctx.handle, memh, ctypes.byref(buf), ctypes.byref(size)), "packing a key")  # type: ignore[attr-defined]
        self._stage_rkey_blob = ctypes.string_at(buf, size.value)
        ucp.rkey_release(buf)
        self._stage_param = ctypes.byref(Param(op_attr_mask=OP_FIELD_MEMH | OP_FIELD_MEMORY_TYPE,
                                               memory_type=self._mem, memh=memh.value))  # type: ignore[attr-defined]
        self._src_lock, self._sink_lock = threading.Lock(), threading.Lock()
        self._kregions: Any = None
        self._copy_stream: Any = None
        if self._mem == MEM_CUDA:  # type: ignore[attr-defined]
            from p2pkv import kernels
            self._kregions = kernels.Regions.of(self.regions)  # type: ignore[attr-defined]
            self._copy_stream = torch.cuda.Stream(device=dev)

    def _free_staging(self) -> None:
        if getattr(self, "_stage_memh", None):
            self._ucp.mem_unmap(self._ctx.handle, self._stage_memh)  # type: ignore[attr-defined]
            self._stage_memh = None

    def _stage_hello(self) -> list[Any] | None:
        if not getattr(self, "_stage_memh", None):
            return None
        return [self._stage.data_ptr(), self._stage_rkey_blob, self._slot]

    # ------------------------------------------------------------------ copies in and out of slots
    def _gather(self, slot: int, region: np.ndarray, off: np.ndarray, length: np.ndarray, nbytes: int) -> None:
        base = slot * self._slot
        if self._mem == MEM_CUDA:  # type: ignore[attr-defined]
            from p2pkv import kernels
            s = self._copy_stream
            s.wait_stream(torch.cuda.current_stream(s.device))
            kernels.gather(self._kregions, region, off, length, out=self._stage[base:base + nbytes], stream=s)
            s.synchronize()
            return
        src = (self._bases[region] + off.astype(np.uint64)).tolist()  # type: ignore[attr-defined]
        dst = (self._stage.data_ptr() + base + np.concatenate([[0], np.cumsum(length)[:-1]])).tolist()
        move = ctypes.memmove
        for d, a, n in zip(dst, src, length.tolist()):
            move(d, a, n)

    def _scatter(self, slot: int, region: np.ndarray, off: np.ndarray, length: np.ndarray, nbytes: int) -> None:
        base = (2 + slot) * self._slot
        if self._mem == MEM_CUDA:  # type: ignore[attr-defined]
            from p2pkv import kernels
            s = self._copy_stream
            kernels.scatter(self._stage[base:base + nbytes], self._kregions, region, off, length, stream=s)
            s.synchronize()
            return
        src = (self._stage.data_ptr() + base + np.concatenate([[0], np.cumsum(length)[:-1]])).tolist()
        dst = (self._bases[region] + off.astype(np.uint64)).tolist()  # type: ignore[attr-defined]
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
                    self._tag_recv(conn, link, np.empty(1, "<i8"), link.tag_in(kind, seq, idx), request_id)  # type: ignore[attr-defined]
                remote = link.stage_base + (2 + s) * link.stage_slot
                self._put_one(conn, link, self._stage.data_ptr() + s * self._slot, nb, remote, link.stage_rkey,  # type: ignore[attr-defined]
                              self._stage_param, request_id)
                self._tag_post(conn, link, link.tag_out(KIND_READY, seq, k), request_id)  # type: ignore[attr-defined]
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
            self._tag_post(conn, link, link.tag_out(KIND_GRANT, seq, 0), request_id)  # type: ignore[attr-defined]
            for k, (r, o, n, nb) in enumerate(chunks):
                self._tag_recv(conn, link, np.empty(1, "<i8"), link.tag_in(KIND_READY, seq, k), request_id)  # type: ignore[attr-defined]
                self._scatter(k % 2, r, o, n, int(nb))
                if k + 2 < len(chunks):
                    self._tag_post(conn, link, link.tag_out(KIND_FREE, seq, k), request_id)  # type: ignore[attr-defined]
        finally:
            self._sink_lock.release()

    def _acquire(self, lock: threading.Lock, conn: Conn, request_id: Any, what: str) -> None:
        if not lock.acquire(timeout=self.timeout):  # type: ignore[attr-defined]
            raise TransferTimeout(f"{what} stayed busy for the {self.timeout:g} s timeout",  # type: ignore[attr-defined]
                                  peer=conn.peer.name, request_id=request_id)
