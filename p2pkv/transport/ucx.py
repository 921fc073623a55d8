"""UCX backend over ucxx: one UCX endpoint per peer, made at the handshake, and a
zero-copy data path in which the side that holds the bytes PUTs each merged
segment straight from its registered KV memory into the peer's (one-sided RMA,
many in flight, one flush), then tells the peer by a tag message derived from
the connection and request. ucxx runs the context, worker, endpoints and a
blocking progress thread; the per-segment calls go to libucp through ctypes,
since ucxx's Python layer has neither RMA nor scatter-gather receives."""
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
from p2pkv.transport import BackendUnavailable
from p2pkv.transport.base import Peer, PeerClosedError, TransferError, TransferHandle, TransferTimeout
from p2pkv.transport.control import Conn, ControlPlaneTransport
from p2pkv.wire import FrameType, ProtocolError, recv_frame, send_frame

__all__ = ["UcxTransport", "describe", "INSTALL_HINT"]

log = logging.getLogger("p2pkv.transport.ucx")

INSTALL_HINT = ("the 'ucx' backend needs ucxx: pip install 'p2pkv[ucx]' (CUDA 12 wheels, also right for CPU-only "
                "machines) or pip install 'p2pkv[ucx-cu13]' (CUDA 13)")

# UCX settings p2pkv applies to its own context unless the environment sets them:
# CMA_MEMORY_INVALIDATE lets UCX keep cma (process_vm_writev) zero-copy lanes on
# endpoints with peer-failure handling; without it every byte goes over tcp/lo.
CONTEXT_DEFAULTS = {"CMA_MEMORY_INVALIDATE": "y"}

_INPROGRESS, _ERR_LAST = 1, 1 << 64  # ucs_status_ptr_t errors are (void*)(-1..-100)
_KIND_TABLE, _KIND_DONE, _KIND_BASE = 1, 2, 3
_MEM_HOST, _MEM_CUDA = 0, 1
_OP_FIELD_MEMORY_TYPE, _OP_FIELD_MEMH = 1 << 6, 1 << 8


class _Param(ctypes.Structure):
    """ucp_request_param_t (UCX >= 1.10 layout, x86_64/aarch64)."""
    _fields_ = [("op_attr_mask", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("request", ctypes.c_void_p),
                ("cb", ctypes.c_void_p), ("datatype", ctypes.c_uint64), ("user_data", ctypes.c_void_p),
                ("reply_buffer", ctypes.c_void_p), ("memory_type", ctypes.c_int), ("recv_info", ctypes.c_void_p),
                ("memh", ctypes.c_void_p)]


class _MapParam(ctypes.Structure):
    """ucp_mem_map_params_t."""
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("flags", ctypes.c_uint), ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported_memh_buffer", ctypes.c_void_p)]


class _Ucp:
    """The few libucp entry points the data path calls, bound once per process."""

    def __init__(self) -> None:
        import libucx  # the wheel that ships libucp; ucxx loads the same file
        libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
        self.ucp = ctypes.CDLL(os.path.join(libdir, "libucp.so"), ctypes.RTLD_LOCAL)
        self.ucs = ctypes.CDLL(os.path.join(libdir, "libucs.so"), ctypes.RTLD_LOCAL)
        vp, sz, u64, st = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int8
        pp = ctypes.POINTER(_Param)
        self.put = self._bind("ucp_put_nbx", vp, vp, vp, sz, u64, vp, pp)
        self.tag_send = self._bind("ucp_tag_send_nbx", vp, vp, vp, sz, u64, pp)
        self.tag_recv = self._bind("ucp_tag_recv_nbx", vp, vp, vp, sz, u64, u64, pp)
        self.flush = self._bind("ucp_ep_flush_nbx", vp, vp, pp)
        self.check = self._bind("ucp_request_check_status", st, vp)
        self.cancel = self._bind("ucp_request_cancel", None, vp, vp)
        self.free = self._bind("ucp_request_free", None, vp)
        self.progress = self._bind("ucp_worker_progress", ctypes.c_uint, vp)
        self.mem_map = self._bind("ucp_mem_map", st, vp, ctypes.POINTER(_MapParam), ctypes.POINTER(vp))
        self.mem_unmap = self._bind("ucp_mem_unmap", st, vp, vp)
        self.rkey_pack = self._bind("ucp_rkey_pack", st, vp, vp, ctypes.POINTER(vp), ctypes.POINTER(sz))
        self.rkey_release = self._bind("ucp_rkey_buffer_release", None, vp)
        self.rkey_unpack = self._bind("ucp_ep_rkey_unpack", st, vp, ctypes.c_char_p, ctypes.POINTER(vp))
        self.rkey_destroy = self._bind("ucp_rkey_destroy", None, vp)
        self.ucs.ucs_status_string.restype = ctypes.c_char_p
        self.ucs.ucs_status_string.argtypes = [st]

    def _bind(self, name: str, res: Any, *args: Any) -> Any:
        fn = getattr(self.ucp, name)
        fn.restype, fn.argtypes = res, list(args)
        return fn

    def status_text(self, status: int) -> str:
        return f"{self.ucs.ucs_status_string(status).decode()} (UCS status {status})"

    @staticmethod
    def ptr_status(p: int | None) -> int:
        """0 for done, 1 for a request in flight, the negative UCS status for an error."""
        if p is None:
            return 0
        return p - _ERR_LAST if p >= _ERR_LAST - 100 else _INPROGRESS


_lib: dict[str, Any] = {}
_lib_lock = threading.Lock()


def _load() -> tuple[Any, _Ucp]:
    """Import ucxx (it sets its UCX environment defaults on import) and bind libucp, or say how to install."""
    with _lib_lock:
        if "ucxx" not in _lib:
            os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets a variable UCX >= 1.19 dropped
            try:
                import libucx  # libucxx loads libucp only when librmm is importable too; p2pkv needs no rmm
                libucx.load_library()
            except ImportError:
                pass
            try:
                import ucxx._lib.libucxx as ucx_api
            except ImportError as e:
                raise BackendUnavailable(f"{INSTALL_HINT} ({e})") from None
            try:
                ucp = _Ucp()
            except (ImportError, OSError, AttributeError) as e:
                raise BackendUnavailable(f"ucxx is installed but libucp could not be bound: {e}; {INSTALL_HINT}") from None
            _lib.update(ucxx=ucx_api, ucp=ucp)
    return _lib["ucxx"], _lib["ucp"]


def describe() -> dict[str, Any]:
    """What the ucx backend uses on this machine (for `p2pkv doctor`): versions, the data path per memory kind,
    the progress mode, and the UCX transports a context here can use."""
    api, _ = _load()
    import ucxx
    ctx = api.UCXContext(_context_config(), feature_flags=(api.Feature.TAG, api.Feature.RMA, api.Feature.WAKEUP))
    tls = sorted({line.rsplit(" ", 1)[-1].split("/")[0] for line in ctx.info.splitlines() if "resource" in line})
    return {
        "ucxx": ucxx.__version__, "ucx": ".".join(map(str, api.get_ucx_version())),
        "transports": tls, "cuda_support": bool(ctx.cuda_support),
        "data_path": "one-sided PUT by the side that holds the bytes, one flush, then a tag message",
        "host_memory": "cma zero-copy put (process_vm_writev); UCX_CMA_MEMORY_INVALIDATE=y keeps it with peer-failure "
                       "handling on",
        "cuda_memory": "cuda_ipc put_zcopy (a PUT, so UCX's default-off cuda_ipc GET is never needed)",
        "progress": "blocking progress thread (epoll), caller-driven progress while a transfer waits",
        "error_handling": "peer failure (errors, not aborts, when a peer dies) plus control-socket EOF and timeouts",
        "context_settings": _context_config(),
    }


def _context_config() -> dict[str, str]:
    return {k: v for k, v in CONTEXT_DEFAULTS.items() if f"UCX_{k}" not in os.environ}


class _Link:
    """The data path to one peer: its endpoint, the unpacked keys of its regions, and the tag space of this
    connection (requests on it are numbered in the same order on both sides)."""

    def __init__(self, ep: Any, rkeys: list[int], bases: np.ndarray, sizes: np.ndarray, cid: int, initiator: bool):
        self.ep, self.handle, self.rkeys, self.bases, self.sizes = ep, ep.handle, rkeys, bases, sizes
        self.cid, self.initiator = cid, initiator
        self.seq = 0
        self.base_seq = 0
        self.lock = threading.Lock()
        self.closed = False

    def tag(self, kind: int, seq: int, *, from_initiator: bool) -> int:
        return (self.cid << 32) | (int(from_initiator) << 31) | (kind << 28) | (seq & 0x0FFFFFFF)


class UcxTransport(ControlPlaneTransport):
    """`get_transport("ucx", listen="127.0.0.1:0", timeout=30, auth_token=None, ucx_config=None)`.

    `ucx_config` adds UCX settings (names without the `UCX_` prefix) to this transport's context."""

    name = "ucx"

    def __init__(self, *, ucx_config: dict[str, str] | None = None, **kw: Any):
        self._api, self._ucp = _load()
        api = self._api
        cfg = {**_context_config(), **(ucx_config or {})}
        self._ctx = api.UCXContext(cfg, feature_flags=(api.Feature.TAG, api.Feature.RMA, api.Feature.WAKEUP))
        self._worker = api.UCXWorker(self._ctx)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
        self._wh = self._worker.handle
        self._addr = bytes(self._worker.address)
        self._memhs: list[int] = []
        self._rkey_blobs: list[bytes] = []
        self._params: list[Any] = []
        self._bases = np.zeros(0, dtype=np.uint64)
        self._mem = _MEM_HOST
        self._tls = threading.local()
        self._baseline_bufs: dict[int, Any] = {}
        self._plain = _Param()
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
        self._mem = _MEM_CUDA if dev.type == "cuda" else _MEM_HOST
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"ucx transport moves host or CUDA memory, not {dev.type}")
        bases = []
        for r in self.regions:
            addr, n = r.data_ptr(), r.numel()
            memh = ctypes.c_void_p()
            mp = _MapParam(field_mask=0b10011, address=addr, length=n, memory_type=self._mem)
            self._check(self._ucp.mem_map(self._ctx.handle, ctypes.byref(mp), ctypes.byref(memh)), "mapping KV memory")
            self._memhs.append(memh.value)
            buf, size = ctypes.c_void_p(), ctypes.c_size_t()
            self._check(self._ucp.rkey_pack(self._ctx.handle, memh, ctypes.byref(buf), ctypes.byref(size)),
                        "packing a remote key")
            self._rkey_blobs.append(ctypes.string_at(buf, size.value))
            self._ucp.rkey_release(buf)
            self._params.append(ctypes.byref(_Param(op_attr_mask=_OP_FIELD_MEMH | _OP_FIELD_MEMORY_TYPE,
                                                    memory_type=self._mem, memh=memh.value)))
            bases.append(addr)
        self._bases = np.asarray(bases, dtype=np.uint64)
        if self._mem == _MEM_CUDA:
            self._restart_progress_on(dev)
        return spec

    def _restart_progress_on(self, dev: torch.device) -> None:
        """UCX's CUDA transports need the device's context current in every thread that progresses the
        worker; restart the progress thread so that it makes it current first."""
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._worker.stop_progress_thread()
        self._worker.set_progress_thread_start_callback(torch.cuda.set_device, cb_args=(index,))
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)

    def _bind_cuda(self) -> None:
        if self._mem == _MEM_CUDA:
            torch.cuda.set_device(self.device)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise TransferError(f"UCX failed {what}: {self._ucp.status_text(status)}", peer=self.local_name)

    # ------------------------------------------------------------------ handshake hooks
    def _hello_extra(self) -> dict[str, Any]:
        nonce = int.from_bytes(os.urandom(8), "little")
        self._tls.nonce = nonce
        return {"ucx": {"addr": self._addr, "nonce": nonce, "mem": self._mem,
                        "regions": [[int(b), k] for b, k in zip(self._bases.tolist(), self._rkey_blobs)]}}

    def _on_connect(self, conn: Conn) -> None:
        info = conn.peer.info.get("ucx")
        if not isinstance(info, dict) or not isinstance(info.get("addr"), bytes):
            raise TransferError("peer sent no UCX worker address in its handshake", peer=conn.peer.name)
        self._bind_cuda()
        mine, theirs = int(self._tls.nonce), int(info["nonce"])
        pair = (mine, theirs) if conn.initiator else (theirs, mine)
        cid = int.from_bytes(hashlib.blake2b(b"%d:%d" % pair, digest_size=4).digest(), "little")
        api = self._api
        addr = api.UCXAddress.create_from_buffer(np.frombuffer(info["addr"], dtype=np.uint8))
        ep = self._worker.create_endpoint_from_worker_address(addr, True)
        rkeys: list[int] = []
        try:
            for base, blob in info["regions"]:
                rk = ctypes.c_void_p()
                self._check(self._ucp.rkey_unpack(ep.handle, blob, ctypes.byref(rk)), "unpacking the peer's key")
                rkeys.append(rk.value)
        except BaseException:
            for rk in rkeys:
                self._ucp.rkey_destroy(rk)
            self._close_ep(ep)
            raise
        sizes = np.asarray([r.nbytes for r in conn.peer.spec.regions], dtype=np.int64)  # type: ignore[union-attr]
        bases = np.asarray([b for b, _ in info["regions"]], dtype=np.uint64)
        conn.extra["ucx"] = _Link(ep, rkeys, bases, sizes, cid, conn.initiator)

    def _on_disconnect(self, conn: Conn) -> None:
        link: _Link | None = conn.extra.pop("ucx", None)
        if link is None:
            return
        link.closed = True
        with link.lock:
            for rk in link.rkeys:
                self._ucp.rkey_destroy(rk)
            link.rkeys = []
            self._close_ep(link.ep)

    def _close_ep(self, ep: Any) -> None:
        try:
            ep.close_blocking(period=1_000_000_000, max_attempts=2)
        except Exception as e:  # noqa: BLE001 - a dead peer's endpoint may refuse a clean close
            log.debug("closing a UCX endpoint: %s", e)

    # ------------------------------------------------------------------ transfers
    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        conn = self._conn(peer)
        region = segments.region.astype(np.int64)
        Segments.check_bounds(region, segments.src, segments.length, [r.nbytes for r in self._require_registered().regions])
        Segments.check_bounds(region, segments.dst, segments.length, [r.nbytes for r in conn.peer.spec.regions])  # type: ignore[union-attr]

        def run(c: Conn) -> None:
            link = self._link(c, request_id)
            seq = self._next(link)
            send_frame(c.sock, FrameType.WRITE, {"req": request_id, "segs": segments.pack("dst"), "notify": notify},
                       payload_len=segments.nbytes)
            self._put_all(c, link, seq, segments.region, segments.src, segments.dst, segments.length, request_id)
            self._expect_ack(c)
        return self._submit(conn, run, request_id, segments.nbytes)

    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        conn = self._conn(peer)
        Segments.check_bounds(segments.region.astype(np.int64), segments.dst, segments.length,
                              [r.nbytes for r in self._require_registered().regions])
        table = np.ascontiguousarray(segments.dst, dtype="<i8")

        def run(c: Conn) -> None:
            link = self._link(c, request_id)
            seq = self._next(link)
            p = None
            if len(table):
                p = self._ucp.tag_send(link.handle, table.ctypes.data, table.nbytes,
                                       link.tag(_KIND_TABLE, seq, from_initiator=True), ctypes.byref(self._plain))
            try:
                send_frame(c.sock, FrameType.READ, {"req": request_id, "segs": segments.pack("src")},
                           payload_len=segments.nbytes)
                self._expect_ack(c)
            except BaseException:
                if self._ucp.ptr_status(p) == _INPROGRESS:
                    self._abandon(p, True, table)
                raise
            self._wait(c, link, p, "sending the destination table", request_id, keep=table, cancel=True)
            self._wait_done(c, link, seq, request_id, from_initiator=False)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a READ: learn where the bytes go from the initiator's table, then PUT them there."""
        link = self._link(conn, request_id)
        seq = self._next(link)
        dst = np.empty(len(off), dtype="<i8")
        if len(dst):
            self._tag_recv(conn, link, dst, link.tag(_KIND_TABLE, seq, from_initiator=True), request_id)
        try:
            Segments.check_bounds(region, dst, length, link.sizes.tolist())
        except ValueError as e:
            self._send_done(conn, link, seq, request_id, ok=False)
            raise TransferError(f"destination table refused: {e}", peer=conn.peer.name, request_id=request_id) from None
        self._put_all(conn, link, seq, region, off, dst, length, request_id)

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        """Serving a WRITE: the initiator PUTs into our blocks; return once it says they landed."""
        link = self._link(conn, request_id)
        self._wait_done(conn, link, self._next(link), request_id, from_initiator=True)

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
        if self._mem == _MEM_CUDA and len(length):
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
                    if p >= _ERR_LAST - 100:
                        raise self._ucx_error(conn, p - _ERR_LAST, "posting a put", request_id)
                    free(p)
            self._wait(conn, link, ucp.flush(ep, ctypes.byref(self._plain)), "flushing puts", request_id)
            self._send_done(conn, link, seq, request_id, ok=True, locked=True)

    def _send_done(self, conn: Conn, link: _Link, seq: int, request_id: Any, *, ok: bool, locked: bool = False) -> None:
        word = np.array([0 if ok else 1], dtype="<i8")
        tag = link.tag(_KIND_DONE, seq, from_initiator=link.initiator)
        if locked:
            self._wait(conn, link, self._ucp.tag_send(link.handle, word.ctypes.data, 8, tag, ctypes.byref(self._plain)),
                       "sending the completion message", request_id, keep=word, watch_socket=False)
        else:
            with link.lock:
                p = self._ucp.tag_send(link.handle, word.ctypes.data, 8, tag, ctypes.byref(self._plain))
                self._wait(conn, link, p, "sending the completion message", request_id, keep=word, watch_socket=False)

    def _wait_done(self, conn: Conn, link: _Link, seq: int, request_id: Any, *, from_initiator: bool) -> None:
        word = np.full(1, -1, dtype="<i8")
        self._tag_recv(conn, link, word, link.tag(_KIND_DONE, seq, from_initiator=from_initiator), request_id)
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
        if st == _INPROGRESS:
            self._bind_cuda()
            deadline = time.monotonic() + self.timeout
            spins, next_check = 0, time.monotonic() + 0.01
            while True:
                st = ucp.check(p)
                if st != _INPROGRESS:
                    break
                if ucp.progress(self._wh) == 0:
                    spins += 1
                    if spins > 64:
                        time.sleep(min(0.001, 2e-6 * spins))
                else:
                    spins = 0
                now = time.monotonic()
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
            if self._ucp.check(p) != _INPROGRESS:
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
            if self._mem == _MEM_CUDA:
                buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
            else:
                buf = np.ones(nbytes, dtype=np.uint8)
            self._baseline_bufs[nbytes] = buf
        return buf

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        link = self._link(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_send(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag(_KIND_BASE, link.base_seq, from_initiator=link.initiator)))
        self._wait_ucxx(conn, link, req)

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        link = self._link(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_recv(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag(_KIND_BASE, link.base_seq, from_initiator=not link.initiator)))
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
