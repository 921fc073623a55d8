"""UCX backend over ucxx: one UCX endpoint per peer, made at the handshake. The side
that holds the bytes always PUTs them (one-sided RMA) into the peer's registered
memory, then says so by a tag message derived from the connection and request:
per merged segment, zero-copy, all in flight and one flush (the `put` path), or
through registered staging slots (the `staged` path, staged.py). ucxx runs the
context, worker, endpoints and a blocking progress thread; libucp (through
ucp.py) takes the per-segment calls that ucxx's Python layer has no API for."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport.ucx.ucp import (ERR_LAST, INPROGRESS, INSTALL_HINT, MEM_CUDA, MEM_HOST, OP_FIELD_MEMH,
                                  OP_FIELD_MEMORY_TYPE, MapParam, Param, context_config, load)
from p2pkv.transport.base import Peer, PeerClosedError, TransferError, TransferHandle, TransferTimeout
from p2pkv.transport.control import Conn, ControlPlaneTransport
from p2pkv.transport.ucx.staged import StagedPath
from p2pkv.wire import FrameType, ProtocolError, recv_frame, send_frame

__all__ = ["UcxTransport", "describe", "INSTALL_HINT", "PATHS"]

log = logging.getLogger("p2pkv.transport.ucx")

PATHS = ("auto", "put", "staged")
# bytes per staging slot (4 slots per transport); on an H100, 256 MiB slots moved large requests 2x faster
# than 64 MiB ones (docs/benchmarks.md, ## ucx)
STAGING_CUDA, STAGING_HOST = 256 << 20, 8 << 20
# A wait polls UCX without sleeping until SPIN_S has passed without progress, then naps NAP_S between polls:
# short steps (a chunk put, a control word) see no sleep latency, long waits leave the core to others.
SPIN_S, NAP_S = 0.002, 0.0001
_KIND_TABLE, _KIND_DONE, _KIND_BASE = 1, 2, 3
_FEATURES = ("TAG", "RMA", "WAKEUP")


def _kernels_ready() -> bool:
    try:
        from p2pkv import kernels
        return kernels.load() is not None
    except Exception:  # noqa: BLE001 - no extension means the per-segment put path
        return False


def resolve_path(path: str, device: torch.device) -> str:
    """'auto' is `staged` for CUDA memory when p2pkv's gather/scatter kernels are built, else `put`."""
    if path not in PATHS:
        raise ValueError(f"ucx path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    return "staged" if device.type == "cuda" and _kernels_ready() else "put"


def describe() -> dict[str, Any]:
    """What the ucx backend uses on this machine (for `p2pkv doctor`): versions, the data path per memory kind,
    the progress mode, and the UCX transports a context here can use."""
    api, _ = load()
    import ucxx
    ctx = api.UCXContext(context_config(), feature_flags=tuple(getattr(api.Feature, f) for f in _FEATURES))
    tls = sorted({line.rsplit(" ", 1)[-1].split("/")[0] for line in ctx.info.splitlines() if "resource" in line})
    return {
        "ucxx": ucxx.__version__, "ucx": ".".join(map(str, api.get_ucx_version())),
        "transports": tls, "cuda_support": bool(ctx.cuda_support),
        "data_path": "one-sided PUT by the side that holds the bytes, then a tag message; never a GET",
        "host_memory": "path 'put': one zero-copy cma put per segment (process_vm_writev); "
                       "UCX_CMA_MEMORY_INVALIDATE=y keeps cma with peer-failure handling on",
        "cuda_memory": "cuda_ipc put_zcopy; path 'auto' is 'staged' (gather kernel, one put per chunk, scatter "
                       "kernel) when p2pkv's CUDA kernels load, else 'put'. A PUT, so UCX's default-off cuda_ipc GET "
                       "(UCX_CUDA_IPC_ENABLE_GET_ZCOPY) is never needed",
        "progress": "blocking progress thread (epoll); the waiting thread drives progress during a transfer",
        "error_handling": "peer failure mode (a dead peer is an error, never an abort) plus control-socket EOF "
                          "and timeouts",
        "context_settings": context_config(),
    }


class _Link:
    """The data path to one peer: its endpoint, the unpacked keys of its regions and staging, and the tag space of
    this connection (requests on it are numbered in the same order on both sides)."""

    def __init__(self, ep: Any, cid: int, initiator: bool):
        self.ep, self.handle, self.cid, self.initiator = ep, ep.handle, cid, initiator
        self.rkeys: list[int] = []
        self.bases = np.zeros(0, dtype=np.uint64)
        self.sizes = np.zeros(0, dtype=np.int64)
        self.staged, self.stage_base, self.stage_rkey, self.stage_slot = False, 0, 0, 0
        self.seq = self.base_seq = 0
        self.lock = threading.Lock()
        self.closed = False

    def _tag(self, kind: int, seq: int, chunk: int, from_initiator: bool) -> int:
        return ((self.cid & 0xFFFFFF) << 40) | (int(from_initiator) << 39) | (kind << 36) | ((seq & 0xFFFFF) << 16) \
            | (chunk & 0xFFFF)

    def tag_out(self, kind: int, seq: int, chunk: int = 0) -> int:
        """Tag of a message this side sends."""
        return self._tag(kind, seq, chunk, self.initiator)

    def tag_in(self, kind: int, seq: int, chunk: int = 0) -> int:
        """Tag of a message the peer sends."""
        return self._tag(kind, seq, chunk, not self.initiator)


class UcxTransport(StagedPath, ControlPlaneTransport):
    """`get_transport("ucx", listen="127.0.0.1:0", timeout=30, auth_token=None, path="auto",
    staging_bytes=None (256 MiB per slot for CUDA, 8 MiB for host memory), ucx_config=None)`.

    `path`: 'put' (one zero-copy put per segment), 'staged' (gather, one put per chunk of `staging_bytes`,
    scatter) or 'auto' (staged for CUDA memory when p2pkv's kernels are built, else put); a connection uses
    'staged' only when both sides chose it. `ucx_config` adds UCX settings (names without `UCX_`)."""

    name = "ucx"

    def __init__(self, *, path: str = "auto", staging_bytes: int | None = None,
                 ucx_config: dict[str, str] | None = None, **kw: Any):
        if path not in PATHS:
            raise ValueError(f"ucx path must be one of {PATHS}, got {path!r}")
        if staging_bytes is not None and staging_bytes < 1 << 16:
            raise ValueError(f"staging_bytes must be at least 64 KiB, got {staging_bytes}")
        self._api, self._ucp = load()
        api = self._api
        self._ctx = api.UCXContext({**context_config(), **(ucx_config or {})},
                                   feature_flags=tuple(getattr(api.Feature, f) for f in _FEATURES))
        self._worker = api.UCXWorker(self._ctx)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
        self._wh = self._worker.handle
        self._addr = bytes(self._worker.address)
        self._path, self._staging_bytes, self.path = path, staging_bytes, path
        self._memhs: list[int] = []
        self._rkey_blobs: list[bytes] = []
        self._params: list[Any] = []
        self._bases = np.zeros(0, dtype=np.uint64)
        self._mem = MEM_HOST
        self._tls = threading.local()
        self._baseline_bufs: dict[int, Any] = {}
        self._plain = Param()
        self._down = False
        try:
            super().__init__(**kw)
        except BaseException:
            self._shutdown_worker()
            raise

    # ------------------------------------------------------------------ registration
    def register(self, tensors: Sequence[torch.Tensor], spec: Any = None) -> Any:
        if self._memhs:
            raise RuntimeError("ucx transport: register() may be called once")
        spec = super().register(tensors, spec)
        dev = self.device
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"ucx transport moves host or CUDA memory, not {dev.type}")
        self._mem = MEM_CUDA if dev.type == "cuda" else MEM_HOST
        bases = []
        for r in self.regions:
            memh = self._map(r.data_ptr(), r.numel(), "mapping KV memory")
            self._params.append(ctypes.byref(Param(op_attr_mask=OP_FIELD_MEMH | OP_FIELD_MEMORY_TYPE,
                                                   memory_type=self._mem, memh=memh)))
            bases.append(r.data_ptr())
        self._bases = np.asarray(bases, dtype=np.uint64)
        if self._mem == MEM_CUDA:
            self._restart_progress_on(dev)
        self.path = resolve_path(self._path, dev)
        if self.path == "staged":
            self._init_staging(self._staging_bytes or (STAGING_CUDA if self._mem == MEM_CUDA else STAGING_HOST))
        return spec

    def _map(self, addr: int, nbytes: int, what: str) -> int:
        memh = ctypes.c_void_p()
        mp = MapParam(field_mask=0b10011, address=addr, length=nbytes, memory_type=self._mem)
        self._check(self._ucp.mem_map(self._ctx.handle, ctypes.byref(mp), ctypes.byref(memh)), what)
        self._memhs.append(memh.value)
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        self._check(self._ucp.rkey_pack(self._ctx.handle, memh, ctypes.byref(buf), ctypes.byref(size)), "packing a key")
        self._rkey_blobs.append(ctypes.string_at(buf, size.value))
        self._ucp.rkey_release(buf)
        return memh.value

    def _restart_progress_on(self, dev: torch.device) -> None:
        """UCX's CUDA transports need the device's context current in every thread that progresses the
        worker; restart the progress thread so that it makes it current first."""
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._worker.stop_progress_thread()
        self._worker.set_progress_thread_start_callback(torch.cuda.set_device, cb_args=(index,))
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)

    def _bind_cuda(self) -> None:
        if self._mem == MEM_CUDA:
            torch.cuda.set_device(self.device)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise TransferError(f"UCX failed {what}: {self._ucp.status_text(status)}", peer=self.local_name)

    # ------------------------------------------------------------------ handshake hooks
    def _hello_extra(self) -> dict[str, Any]:
        nonce = int.from_bytes(os.urandom(8), "little")
        self._tls.nonce = nonce
        return {"ucx": {"addr": self._addr, "nonce": nonce, "mem": self._mem, "stage": self._stage_hello(),
                        "regions": [[int(b), k] for b, k in zip(self._bases.tolist(), self._rkey_blobs)]}}

    def _on_connect(self, conn: Conn) -> None:
        info = conn.peer.info.get("ucx")
        if not isinstance(info, dict) or not isinstance(info.get("addr"), bytes):
            raise TransferError("peer sent no UCX worker address in its handshake", peer=conn.peer.name)
        self._bind_cuda()
        mine, theirs = int(self._tls.nonce), int(info["nonce"])
        pair = (mine, theirs) if conn.initiator else (theirs, mine)
        cid = int.from_bytes(hashlib.blake2b(b"%d:%d" % pair, digest_size=3).digest(), "little")
        addr = self._api.UCXAddress.create_from_buffer(np.frombuffer(info["addr"], dtype=np.uint8))
        link = _Link(self._worker.create_endpoint_from_worker_address(addr, True), cid, conn.initiator)
        try:
            link.rkeys = [self._unpack(link, blob) for _, blob in info["regions"]]
            stage = info.get("stage")
            if stage and self._stage_hello():
                link.staged, link.stage_base, link.stage_slot = True, int(stage[0]), int(stage[2])
                link.stage_rkey = self._unpack(link, stage[1])
        except BaseException:
            self._release(link)
            raise
        link.sizes = np.asarray([r.nbytes for r in conn.peer.spec.regions], dtype=np.int64)  # type: ignore[union-attr]
        link.bases = np.asarray([b for b, _ in info["regions"]], dtype=np.uint64)
        conn.extra["ucx"] = link

    def _unpack(self, link: _Link, blob: bytes) -> int:
        rk = ctypes.c_void_p()
        self._check(self._ucp.rkey_unpack(link.handle, blob, ctypes.byref(rk)), "unpacking the peer's key")
        return rk.value  # type: ignore[return-value]

    def _on_disconnect(self, conn: Conn) -> None:
        link: _Link | None = conn.extra.pop("ucx", None)
        if link is not None:
            link.closed = True
            with link.lock:
                self._release(link)

    def _release(self, link: _Link) -> None:
        for rk in link.rkeys + ([link.stage_rkey] if link.stage_rkey else []):
            self._ucp.rkey_destroy(rk)
        link.rkeys, link.stage_rkey = [], 0
        try:
            link.ep.close_blocking(period=1_000_000_000, max_attempts=2)
        except Exception as e:  # noqa: BLE001 - a dead peer's endpoint may refuse a clean close
            log.debug("closing a UCX endpoint: %s", e)

    # ------------------------------------------------------------------ transfers
    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        conn = self._conn(peer)
        self._check_request(segments, request_id, notify)
        region = segments.region.astype(np.int64)
        Segments.check_bounds(region, segments.src, segments.length, [r.nbytes for r in self._require_registered().regions])
        Segments.check_bounds(region, segments.dst, segments.length, [r.nbytes for r in conn.peer.spec.regions])  # type: ignore[union-attr]

        def run(c: Conn) -> None:
            link = self._link(c, request_id)
            seq = self._next(link)
            send_frame(c.sock, FrameType.WRITE, {"req": request_id, "segs": segments.pack("dst"), "notify": notify},
                       payload_len=segments.nbytes)
            if link.staged:
                self._staged_send(c, link, seq, region, segments.src, segments.length, request_id)
            else:
                self._put_all(c, link, seq, region, segments.src, segments.dst, segments.length, request_id)
            self._expect_ack(c)
        return self._submit(conn, run, request_id, segments.nbytes)

    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        conn = self._conn(peer)
        self._check_request(segments, request_id)
        region = segments.region.astype(np.int64)
        Segments.check_bounds(region, segments.dst, segments.length, [r.nbytes for r in self._require_registered().regions])
        table = np.ascontiguousarray(segments.dst, dtype="<i8")

        def run(c: Conn) -> None:
            link = self._link(c, request_id)
            seq = self._next(link)
            p = None
            if len(table) and not link.staged:
                p = self._ucp.tag_send(link.handle, table.ctypes.data, table.nbytes, link.tag_out(_KIND_TABLE, seq),
                                       ctypes.byref(self._plain))
            try:
                send_frame(c.sock, FrameType.READ, {"req": request_id, "segs": segments.pack("src")},
                           payload_len=segments.nbytes)
                self._expect_ack(c)
            except BaseException:
                if self._ucp.ptr_status(p) == INPROGRESS:
                    self._abandon(p, True, table)
                raise
            if link.staged:
                self._staged_recv(c, link, seq, region, segments.dst, segments.length, request_id)
            else:
                self._wait(c, link, p, "sending the destination table", request_id, keep=table, cancel=True)
                self._wait_done(c, link, seq, request_id)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a READ: learn where the bytes go (the initiator's table) and PUT them there, or stage them."""
        link = self._link(conn, request_id)
        seq = self._next(link)
        if link.staged:
            self._staged_send(conn, link, seq, region, off, length, request_id)
            return
        dst = np.empty(len(off), dtype="<i8")
        if len(dst):
            self._tag_recv(conn, link, dst, link.tag_in(_KIND_TABLE, seq), request_id)
        try:
            Segments.check_bounds(region, dst, length, link.sizes.tolist())
        except ValueError as e:
            self._tag_post(conn, link, link.tag_out(_KIND_DONE, seq), request_id, word=1)
            raise TransferError(f"destination table refused: {e}", peer=conn.peer.name, request_id=request_id) from None
        self._put_all(conn, link, seq, region, off, dst, length, request_id)

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a WRITE: the initiator PUTs into our blocks (or our slots); return once they landed."""
        link = self._link(conn, request_id)
        seq = self._next(link)
        if link.staged:
            self._staged_recv(conn, link, seq, region, off, length, request_id)
        else:
            self._wait_done(conn, link, seq, request_id)

    def _next(self, link: _Link) -> int:
        link.seq += 1
        return link.seq

    def _link(self, conn: Conn, request_id: Any) -> _Link:
        link = conn.extra.get("ucx")
        if link is None or link.closed:
            raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
        return link

    def _put_all(self, conn: Conn, link: _Link, seq: int, region: np.ndarray, src: np.ndarray, dst: np.ndarray,
                 length: np.ndarray, request_id: Any) -> None:
        """PUT every segment (all in flight at once), flush the endpoint, then send DONE."""
        ucp = self._ucp
        self._bind_cuda()
        if self._mem == MEM_CUDA and len(length):
            torch.cuda.current_stream(self.device).synchronize()
        region = np.asarray(region, dtype=np.int64)
        la = (self._bases[region] + src.astype(np.uint64)).tolist()
        ra = (link.bases[region] + dst.astype(np.uint64)).tolist()
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            ep, put, free, params, rkeys = link.handle, ucp.put, ucp.free, self._params, link.rkeys
            for a, b, n, r in zip(la, ra, length.tolist(), region.tolist()):
                p = put(ep, a, n, b, rkeys[r], params[r])
                if p is not None:
                    if p >= ERR_LAST - 100:
                        raise self._ucx_error(conn, p - ERR_LAST, "posting a put", request_id)
                    free(p)
            self._wait(conn, link, ucp.flush(ep, ctypes.byref(self._plain)), "flushing puts", request_id)
        self._tag_post(conn, link, link.tag_out(_KIND_DONE, seq), request_id)

    def _put_one(self, conn: Conn, link: _Link, local: int, nbytes: int, remote: int, rkey: int, param: Any,
                 request_id: Any) -> None:
        """One put of a contiguous range, flushed (the staged path's per-chunk step)."""
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            p = self._ucp.put(link.handle, local, nbytes, remote, rkey, param)
            if p is not None:
                if p >= ERR_LAST - 100:
                    raise self._ucx_error(conn, p - ERR_LAST, "posting a put", request_id)
                self._ucp.free(p)
            self._wait(conn, link, self._ucp.flush(link.handle, ctypes.byref(self._plain)), "flushing a put",
                       request_id)

    def _tag_post(self, conn: Conn, link: _Link, tag: int, request_id: Any, word: int = 0) -> None:
        """Send an 8-byte control word (0: ok) and wait for local completion. The peer may already be answering
        on the control socket, so this wait never treats socket traffic as an abort."""
        buf = np.array([word], dtype="<i8")
        with link.lock:
            if link.closed:
                raise PeerClosedError("UCX endpoint is closed", peer=conn.peer.name, request_id=request_id)
            p = self._ucp.tag_send(link.handle, buf.ctypes.data, 8, tag, ctypes.byref(self._plain))
            self._wait(conn, link, p, "sending a control message", request_id, keep=buf, watch_socket=False)

    def _wait_done(self, conn: Conn, link: _Link, seq: int, request_id: Any) -> None:
        word = np.full(1, -1, dtype="<i8")
        self._tag_recv(conn, link, word, link.tag_in(_KIND_DONE, seq), request_id)
        if int(word[0]) != 0:
            raise TransferError("the peer could not complete the transfer (see its log)", peer=conn.peer.name,
                                request_id=request_id)

    def _tag_recv(self, conn: Conn, link: _Link, buf: np.ndarray, tag: int, request_id: Any) -> None:
        p = self._ucp.tag_recv(self._wh, buf.ctypes.data, buf.nbytes, tag, (1 << 64) - 1, ctypes.byref(self._plain))
        self._wait(conn, link, p, "waiting for the peer's message", request_id, keep=buf, cancel=True)

    # ------------------------------------------------------------------ waiting
    def _wait(self, conn: Conn, link: _Link, p: int | None, what: str, request_id: Any, *, keep: Any = None,
              cancel: bool = False, watch_socket: bool = True) -> None:
        """Drive progress until request `p` completes; a UCX error, the link closing, `timeout` seconds without
        completion or (with `watch_socket`, where the peer must be silent) anything on the control socket turn
        into a TransferError naming peer and request."""
        ucp = self._ucp
        st = ucp.ptr_status(p)
        if st == INPROGRESS:
            self._bind_cuda()
            now = time.monotonic()
            deadline, next_check, busy_until = now + self.timeout, now + 0.01, now + SPIN_S
            while True:
                st = ucp.check(p)
                if st != INPROGRESS:
                    break
                made = ucp.progress(self._wh)
                now = time.monotonic()
                if made:
                    busy_until = now + SPIN_S
                elif now > busy_until:
                    time.sleep(NAP_S)
                if now >= next_check:
                    next_check = now + 0.01
                    abort = self._abort_reason(conn, link, now, deadline, watch_socket)
                    if abort is not None:
                        self._abandon(p, cancel, keep)
                        raise abort[0](f"{what}: {abort[1]}", peer=conn.peer.name, request_id=request_id)
            ucp.free(p)
        if st != 0:
            raise self._ucx_error(conn, st, what, request_id)

    def _abort_reason(self, conn: Conn, link: _Link, now: float, deadline: float,
                      watch_socket: bool) -> tuple[type[TransferError], str] | None:
        if link.closed or conn.dead is not None or self._down:
            return PeerClosedError, "the connection was closed"
        said = _control_interrupt(conn.sock) if watch_socket else None
        if said is not None:
            return PeerClosedError, said
        if now >= deadline:
            return TransferTimeout, f"no completion within the {self.timeout:g} s timeout"
        return None

    def _abandon(self, p: int, cancel: bool, keep: Any) -> None:
        """Stop waiting for request `p`: cancel it where UCX can, and keep its buffer alive until UCX is done."""
        if cancel:
            self._ucp.cancel(self._wh, p)
        for _ in range(100):
            if self._ucp.check(p) != INPROGRESS:
                self._ucp.free(p)
                return
            self._ucp.progress(self._wh)
            time.sleep(0.001)
        self._ucp.free(p)
        if keep is not None:
            _graveyard.append(keep)

    def _ucx_error(self, conn: Conn, status: int, what: str, request_id: Any) -> TransferError:
        text = f"UCX error while {what}: {self._ucp.status_text(status)}"
        if status in (-3, -6, -24, -25) or -89 <= status <= -40:  # I/O, unreachable, not connected, reset, link/ep
            return PeerClosedError(text, peer=conn.peer.name, request_id=request_id)
        if status == -20:
            return TransferTimeout(text, peer=conn.peer.name, request_id=request_id)
        return TransferError(text, peer=conn.peer.name, request_id=request_id)

    # ------------------------------------------------------------------ baseline: one contiguous ucxx send
    def _baseline_buf(self, nbytes: int) -> Any:
        buf = self._baseline_bufs.get(nbytes)
        if buf is None:
            self._baseline_bufs.clear()
            if self._mem == MEM_CUDA:
                buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
            else:
                buf = np.ones(nbytes, dtype=np.uint8)
            self._baseline_bufs[nbytes] = buf
        return buf

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        link = self._link(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_send(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag_out(_KIND_BASE, link.base_seq)))
        self._wait_ucxx(conn, link, req)

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        link = self._link(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_recv(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag_in(_KIND_BASE, link.base_seq)))
        self._wait_ucxx(conn, link, req)

    def _array(self, buf: Any) -> Any:
        from ucxx._lib.arr import Array
        return Array(buf)

    def _wait_ucxx(self, conn: Conn, link: _Link, req: Any) -> None:
        self._bind_cuda()
        deadline = time.monotonic() + self.timeout * 4
        while not req.completed:
            if self._ucp.progress(self._wh) == 0:
                time.sleep(0)
            if time.monotonic() > deadline or link.closed or conn.dead is not None:
                raise TransferTimeout("baseline send did not complete", peer=conn.peer.name, request_id="baseline")
        req.check_error()

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        if self._down:
            return
        self._down = True
        try:
            super().close()
        finally:
            self._baseline_bufs.clear()
            self._free_staging()
            for m in self._memhs:
                self._ucp.mem_unmap(self._ctx.handle, m)
            self._memhs = []
            self._shutdown_worker()

    def _shutdown_worker(self) -> None:
        try:
            self._worker.stop_progress_thread()
        except Exception as e:  # noqa: BLE001
            log.debug("stopping the UCX progress thread: %s", e)


_graveyard: list[Any] = []


def _control_interrupt(sock: socket.socket) -> str | None:
    """Mid-transfer the peer sends nothing on the control socket; anything there (EOF, an ERROR or CLOSE
    frame) ends the transfer. Returns why, or None while the socket is quiet."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return None
        if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return "the peer closed its connection or died"
        f = recv_frame(sock)
    except BlockingIOError:
        return None
    except (OSError, ValueError, ProtocolError) as e:
        return f"the control connection broke ({e})"
    if f.type == FrameType.ERROR:
        return f"the peer reported: {f.meta.get('message', '?')}"
    return f"the peer sent {f.type.name} in the middle of the transfer"
