"""UCX requests that complete without Python: the memory of each request is ours
(UCP_OP_ATTR_FIELD_REQUEST), with a POSIX semaphore where the request's user part
begins, and the completion callback UCX runs (in ucxx's progress thread, or inline)
is libc's `sem_post` itself. `done()` reads the request's status; `wait()` blocks in
`sem_timedwait`, through ctypes, without the GIL. No Python callback, no Python thread."""
from __future__ import annotations

import ctypes
import platform
import time
from typing import Any

from p2pkv.transport.ucx.ucp import (ERR_LAST, INPROGRESS, OP_FIELD_CALLBACK, OP_FIELD_MEMH, OP_FIELD_MEMORY_TYPE,
                                     OP_FIELD_REQUEST, Param, Ucp)

__all__ = ["Requests", "Req"]

# sem_t is 32 bytes on glibc x86_64 and aarch64; room for any libc
_SEM_BYTES, _ALIGN = 64, 64
# UCX calls a send callback as cb(request, status, user_data) and a receive callback as
# cb(request, status, info, user_data); sem_post(sem_t *) reads only the first argument. Calling a
# function through a pointer with more arguments than it declares is well defined in the calling
# conventions of every platform the ucxx wheels ship for (System V x86-64, AAPCS64, ELFv2 ppc64le).
_ABI_OK = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64", "ppc64le")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Requests:
    """Per transport: libc's semaphore calls and the request size of its UCX context."""

    def __init__(self, ucp: Ucp, context: int):
        if not _ABI_OK:
            raise OSError(f"p2pkv's ucx requests complete through sem_post, checked only on x86_64, aarch64 and "
                          f"ppc64le, not {platform.machine()}")
        self.ucp = ucp
        libc = ctypes.CDLL(None, use_errno=True)
        self.sem_init = libc.sem_init
        self.sem_init.argtypes, self.sem_init.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint], ctypes.c_int
        held = ctypes.PyDLL(None)  # sem_post never blocks: keep the GIL
        self.sem_post = held.sem_post
        self.sem_post.argtypes, self.sem_post.restype = [ctypes.c_void_p], ctypes.c_int
        self.sem_post_addr = ctypes.cast(libc.sem_post, ctypes.c_void_p).value
        self.sem_timedwait = libc.sem_timedwait  # CDLL: blocks with the GIL released
        self.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
        self.sem_timedwait.restype = ctypes.c_int
        self.head = ucp.request_size(context)

    def new(self, memory_type: int | None = None, memh: int | None = None) -> "Req":
        return Req(self, memory_type, memh)


class Req:
    """One UCX operation whose request memory is this object's. Post it with `param`, hand the
    returned status pointer to `posted`, then poll `status()` or block in `wait()`."""

    __slots__ = ("_rq", "_buf", "ptr", "param", "_status")

    def __init__(self, rq: Requests, memory_type: int | None, memh: int | None):
        self._rq = rq
        self._buf = ctypes.create_string_buffer(rq.head + _SEM_BYTES + 2 * _ALIGN)
        base = ctypes.addressof(self._buf)
        self.ptr = -(-(base + rq.head) // _ALIGN) * _ALIGN  # UCX's part lies just before, ours (the semaphore) here
        if rq.sem_init(self.ptr, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
        mask = OP_FIELD_REQUEST | OP_FIELD_CALLBACK
        if memory_type is not None:
            mask |= OP_FIELD_MEMORY_TYPE
        if memh is not None:
            mask |= OP_FIELD_MEMH
        self.param = Param(op_attr_mask=mask, request=self.ptr, cb=rq.sem_post_addr, memory_type=memory_type or 0,
                           memh=memh)
        self._status: int | None = None  # None: not posted yet

    def posted(self, p: int | None) -> int:
        """Record what the posting call returned; returns the status (0 done, INPROGRESS, <0 error)."""
        if p is None:
            self._status = 0  # completed in the call; UCX runs no callback then
        elif p >= ERR_LAST - 100:
            self._status = p - ERR_LAST
        else:
            self._status = INPROGRESS
        return self._status

    def status(self) -> int:
        """0 done, INPROGRESS (1), or the negative UCS status it failed with. Never blocks."""
        st = self._status
        if st == INPROGRESS:
            st = self._status = int(self._rq.ucp.check(self.ptr))
        return 0 if st is None else st

    @property
    def in_flight(self) -> bool:
        return self._status == INPROGRESS and self.status() == INPROGRESS

    def wait(self, seconds: float) -> int:
        """Block, without the GIL, until the request completes or `seconds` pass; returns status()."""
        if self.status() != INPROGRESS:
            return self._status  # type: ignore[return-value]
        rq = self._rq
        end = time.time() + max(seconds, 0.0)
        ts = _Timespec(int(end), int((end % 1) * 1e9))
        if rq.sem_timedwait(self.ptr, ctypes.byref(ts)) == 0:
            rq.sem_post(self.ptr)  # latch: the semaphore stays posted for any other waiter
            # UCX marks the request complete right after the callback returns: at most a few instructions
            while self.status() == INPROGRESS:
                rq.sem_timedwait(self.ptr, ctypes.byref(ts))
                rq.sem_post(self.ptr)
        return self.status()

    def keep_alive(self) -> Any:
        """What must outlive this request while UCX may still write to it."""
        return self._buf
