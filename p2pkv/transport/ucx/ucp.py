"""libucp through ctypes, for the ucx backend: ucxx (imported lazily) owns the context,
worker and endpoints; these bindings add what its Python layer lacks (memory
registration, remote keys, one-sided gets and puts, flushes, raw tag messages and
probes) with plain integer handles, so that posting one segment costs one foreign call.
The posting calls never block, so they keep the GIL (see `Ucp`); only registration
and the waits in request.py release it."""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from p2pkv.transport import BackendUnavailable

__all__ = ["INSTALL_HINT", "CONTEXT_DEFAULTS", "INPROGRESS", "ERR_LAST", "MEM_HOST", "MEM_CUDA", "Param", "MapParam",
           "TagRecvInfo", "Ucp", "load", "context_config", "OP_FIELD_REQUEST", "OP_FIELD_CALLBACK",
           "OP_FIELD_MEMORY_TYPE", "OP_FIELD_MEMH"]

INSTALL_HINT = ("the 'ucx' backend needs ucxx: pip install 'p2pkv[ucx]' (CUDA 12 wheels, also right for CPU-only "
                "machines) or pip install 'p2pkv[ucx-cu13]' (CUDA 13)")

# UCX settings p2pkv applies to its own context unless the environment sets them:
# CMA_MEMORY_INVALIDATE lets UCX keep cma (process_vm_writev) zero-copy lanes on
# endpoints with peer-failure handling; without it every byte goes over tcp/lo.
CONTEXT_DEFAULTS = {"CMA_MEMORY_INVALIDATE": "y"}

INPROGRESS, ERR_LAST = 1, 1 << 64  # ucs_status_ptr_t errors are (void*)(-1..-100)
MEM_HOST, MEM_CUDA = 0, 1
OP_FIELD_REQUEST, OP_FIELD_CALLBACK, OP_FIELD_MEMORY_TYPE, OP_FIELD_MEMH = 1 << 0, 1 << 1, 1 << 6, 1 << 8
ATTR_FIELD_REQUEST_SIZE = 1 << 0


class Param(ctypes.Structure):
    """ucp_request_param_t (UCX >= 1.10 layout, x86_64/aarch64)."""
    _fields_ = [("op_attr_mask", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("request", ctypes.c_void_p),
                ("cb", ctypes.c_void_p), ("datatype", ctypes.c_uint64), ("user_data", ctypes.c_void_p),
                ("reply_buffer", ctypes.c_void_p), ("memory_type", ctypes.c_int), ("recv_info", ctypes.c_void_p),
                ("memh", ctypes.c_void_p)]


class MapParam(ctypes.Structure):
    """ucp_mem_map_params_t."""
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("flags", ctypes.c_uint), ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported_memh_buffer", ctypes.c_void_p)]


class TagRecvInfo(ctypes.Structure):
    """ucp_tag_recv_info_t."""
    _fields_ = [("sender_tag", ctypes.c_uint64), ("length", ctypes.c_size_t)]


class _ContextAttr(ctypes.Structure):
    """ucp_context_attr_t, up to request_size (the only field asked for), padded for later fields."""
    _fields_ = [("field_mask", ctypes.c_uint64), ("request_size", ctypes.c_size_t), ("_rest", ctypes.c_char * 256)]


class Ucp:
    """The few libucp entry points the data path calls, bound once per process.

    Calls that only post or check (get, put, flush, tag send/receive/probe, request status, worker
    signal) are bound through `ctypes.PyDLL`, which keeps the GIL: they return in microseconds, and a
    per-segment call that released the GIL would, with any other Python thread runnable in the
    process, wait up to a switch interval (5 ms) to take it back, per segment. The calls that may
    take long (memory registration) release it."""

    def __init__(self) -> None:
        import libucx  # the wheel that ships libucp; ucxx loads the same file
        libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
        path = os.path.join(libdir, "libucp.so")
        self.ucp = ctypes.CDLL(path, ctypes.RTLD_LOCAL)  # releases the GIL in every call
        self.ucp_held = ctypes.PyDLL(path, ctypes.RTLD_LOCAL)  # the same library; keeps the GIL
        self.ucs = ctypes.CDLL(os.path.join(libdir, "libucs.so"), ctypes.RTLD_LOCAL)
        vp, sz, u64, st = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int8
        pp = ctypes.POINTER(Param)
        held = self._bind_held
        self.put = held("ucp_put_nbx", vp, vp, vp, sz, u64, vp, pp)
        self.get = held("ucp_get_nbx", vp, vp, vp, sz, u64, vp, pp)
        self.tag_send = held("ucp_tag_send_nbx", vp, vp, vp, sz, u64, pp)
        self.tag_recv = held("ucp_tag_recv_nbx", vp, vp, vp, sz, u64, u64, pp)
        self.tag_probe = held("ucp_tag_probe_nb", vp, vp, u64, u64, ctypes.c_int, ctypes.POINTER(TagRecvInfo))
        self.tag_msg_recv = held("ucp_tag_msg_recv_nbx", vp, vp, vp, sz, vp, pp)
        self.flush = held("ucp_ep_flush_nbx", vp, vp, pp)
        self.check = held("ucp_request_check_status", st, vp)
        self.cancel = held("ucp_request_cancel", None, vp, vp)
        self.free = held("ucp_request_free", None, vp)
        self.signal = held("ucp_worker_signal", st, vp)
        self.progress = self._bind("ucp_worker_progress", ctypes.c_uint, vp)
        self.context_query = self._bind("ucp_context_query", st, vp, ctypes.POINTER(_ContextAttr))
        self.mem_map = self._bind("ucp_mem_map", st, vp, ctypes.POINTER(MapParam), ctypes.POINTER(vp))
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

    def _bind_held(self, name: str, res: Any, *args: Any) -> Any:
        fn = getattr(self.ucp_held, name)
        fn.restype, fn.argtypes = res, list(args)
        return fn

    def request_size(self, context: int) -> int:
        """Bytes UCX keeps in front of a request that the caller allocates (ucp_context_query)."""
        attr = _ContextAttr(field_mask=ATTR_FIELD_REQUEST_SIZE)
        status = self.context_query(context, ctypes.byref(attr))
        if status != 0:
            raise OSError(f"ucp_context_query failed: {self.status_text(status)}")
        return int(attr.request_size)

    def status_text(self, status: int) -> str:
        return f"{self.ucs.ucs_status_string(status).decode()} (UCS status {status})"

    @staticmethod
    def ptr_status(p: int | None) -> int:
        """0 for done, 1 for a request in flight, the negative UCS status for an error."""
        if p is None:
            return 0
        return p - ERR_LAST if p >= ERR_LAST - 100 else INPROGRESS


_lib: dict[str, Any] = {}
_lib_lock = threading.Lock()


def load() -> tuple[Any, Ucp]:
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
                ucp = Ucp()
            except (ImportError, OSError, AttributeError) as e:
                raise BackendUnavailable(f"ucxx is installed but libucp could not be bound: {e}; {INSTALL_HINT}") from None
            _lib.update(ucxx=ucx_api, ucp=ucp)
    return _lib["ucxx"], _lib["ucp"]


def context_config() -> dict[str, str]:
    """CONTEXT_DEFAULTS minus what the environment already sets."""
    return {k: v for k, v in CONTEXT_DEFAULTS.items() if f"UCX_{k}" not in os.environ}
