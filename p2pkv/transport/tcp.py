"""TCP backend: payload bytes go straight from the registered KV memory into the
socket and from the socket into the destination blocks with vectored calls
(`sendmsg` / `recvmsg_into`, up to IOV_MAX buffers each); CUDA tensors go through
a bounded, double-buffered pinned staging area overlapped with the socket."""
from __future__ import annotations

import bisect
import itertools
import os
import socket
import ssl
import struct
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from p2pkv import kernels
from p2pkv.transport.control import Conn, ControlPlaneTransport
from p2pkv.wire import recv_into_exact

__all__ = ["TcpTransport", "sendv", "recvv"]

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


BATCH_BYTES = 32 << 20


def _batches(views: list[memoryview]) -> list[tuple[int, int, int]]:
    """(start, end, bytes) of each vectored call: up to IOV_MAX buffers or BATCH_BYTES."""
    cum = list(itertools.accumulate((v.nbytes for v in views), initial=0))
    out, i, n = [], 0, len(views)
    while i < n:
        j = min(n, i + IOV_MAX, max(i + 1, bisect.bisect_right(cum, cum[i] + BATCH_BYTES) - 1))
        out.append((i, j, cum[j] - cum[i]))
        i = j
    return out


def _advance(views: list[memoryview], i: int, moved: int) -> int:
    """Index of the first view not fully moved after `moved` more bytes; trims a partly moved view."""
    while moved:
        k = views[i].nbytes
        if moved >= k:
            moved -= k
            i += 1
        else:
            views[i] = views[i][moved:]
            moved = 0
    return i


@contextmanager
def kernel_timeouts(sock: socket.socket, timeout: float) -> Iterator[None]:
    """Run the block in blocking mode with the timeout enforced by the kernel
    (SO_RCVTIMEO/SO_SNDTIMEO), so one `recvmsg_into(MSG_WAITALL)` can fill a whole
    iovec in one syscall instead of Python polling between partial reads."""
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)
    try:
        yield
    except BlockingIOError:
        raise socket.timeout(f"no progress within {timeout:g} s") from None
    finally:
        sock.settimeout(timeout)


def sendv(sock: socket.socket, views: list[memoryview]) -> None:
    """Send every view, in order, with as few syscalls as the kernel allows (a blocking
    socket takes a whole batch per call; a partial send is resumed exactly)."""
    for i, j, nbytes in _batches(views):
        while i < j:
            sent = sock.sendmsg(views[i:j])
            if sent == nbytes:
                break
            nbytes -= sent
            i = _advance(views, i, sent)


def recvv(sock: socket.socket, views: list[memoryview], flags: int = 0) -> None:
    """Fill every view, in order; ConnectionResetError if the peer closes early."""
    for i, j, nbytes in _batches(views):
        while i < j:
            got = sock.recvmsg_into(views[i:j], 0, flags)[0]
            if got == 0:
                raise ConnectionResetError(f"peer closed the connection with {nbytes} bytes of this batch still to come")
            if got == nbytes:
                break
            nbytes -= got
            i = _advance(views, i, got)


class _Staging:
    """Two pinned host buffers used alternately, so the device copy of chunk i+1
    runs while chunk i is on the socket."""

    def __init__(self, nbytes: int, device: torch.device):
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        self.events = [torch.cuda.Event(), torch.cuda.Event()]
        self.stream = torch.cuda.Stream(device=device)
        self.size = nbytes


def _chunks(length: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Split segment indices into consecutive groups of at most `limit` bytes (a
    segment larger than `limit` gets a group of its own and is split later)."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(length.tolist()):
        if acc and acc + n > limit:
            out.append((start, i))
            start, acc = i, 0
        acc += n
    if start < len(length):
        out.append((start, len(length)))
    return out


class TcpTransport(ControlPlaneTransport):
    """`get_transport("tcp", listen="127.0.0.1:0", timeout=30, auth_token=None, staging_bytes=16 MiB)`."""

    name = "tcp"

    def __init__(self, *, staging_bytes: int = 16 << 20, sock_buf_bytes: int = 4 << 20, **kw: Any):
        super().__init__(**kw)
        if staging_bytes < 1 << 16:
            raise ValueError(f"staging_bytes must be at least 64 KiB, got {staging_bytes}")
        self.staging_bytes = int(staging_bytes)
        self.sock_buf_bytes = int(sock_buf_bytes)
        self._mvs: list[memoryview] = []
        self._staging: _Staging | None = None
        self._bbuf: memoryview | None = None

    def register(self, tensors: Sequence[torch.Tensor], spec: Any = None) -> Any:
        spec = super().register(tensors, spec)
        if self.device.type == "cpu":
            self._mvs = [memoryview(r.numpy()) for r in self.regions]
        return spec

    def _on_connect(self, conn: Conn) -> None:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, opt, self.sock_buf_bytes)
            except OSError:
                pass

    def _views(self, region: np.ndarray, off: np.ndarray, length: np.ndarray) -> list[memoryview]:
        mvs = self._mvs
        return [mvs[r][o:o + n] for r, o, n in zip(region.tolist(), off.tolist(), length.tolist())]

    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        if isinstance(conn.sock, ssl.SSLSocket):
            for v in self._views(region, off, length) if self.device.type == "cpu" else ():
                conn.sock.sendall(v)
            if self.device.type != "cpu":
                self._send_staged(conn.sock, region, off, length)
        elif self.device.type == "cpu":
            views = self._views(region, off, length)
            with kernel_timeouts(conn.sock, self.timeout):
                sendv(conn.sock, views)
        else:
            self._send_staged(conn.sock, region, off, length)

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        if isinstance(conn.sock, ssl.SSLSocket):
            if self.device.type == "cpu":
                for v in self._views(region, off, length):
                    recv_into_exact(conn.sock, v)
            else:
                self._recv_staged(conn.sock, region, off, length)
        elif self.device.type == "cpu":
            views = self._views(region, off, length)
            with kernel_timeouts(conn.sock, self.timeout):
                recvv(conn.sock, views, socket.MSG_WAITALL)
        else:
            self._recv_staged(conn.sock, region, off, length)

    # ---------------------------------------------------------------- baseline: one contiguous buffer
    def _baseline_buf(self, nbytes: int) -> memoryview:
        """One contiguous buffer of the whole size, kept for the next call (as a raw user would)."""
        if self._bbuf is None or len(self._bbuf) < nbytes:
            self._bbuf = None
            self._bbuf = memoryview(bytearray(nbytes))
        return self._bbuf[:nbytes]

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        conn.sock.sendall(self._baseline_buf(nbytes))

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        recv_into_exact(conn.sock, self._baseline_buf(nbytes))

    # ---------------------------------------------------------------- CUDA: pinned staging, overlapped
    def _stage(self) -> _Staging:
        if self._staging is None:
            self._staging = _Staging(self.staging_bytes, self.device)
            self._kregions = kernels.Regions.of(self.regions)
        return self._staging

    def _pieces(self, region: np.ndarray, off: np.ndarray, length: np.ndarray) -> list[list[tuple[int, int, int]]]:
        """Segments cut to fit the staging buffers: lists of (region, offset, length) per chunk."""
        lim = self.staging_bytes
        flat: list[tuple[int, int, int]] = []
        for r, o, n in zip(region.tolist(), off.tolist(), length.tolist()):
            while n > lim:
                flat.append((r, o, lim))
                o, n = o + lim, n - lim
            flat.append((r, o, n))
        lens = np.array([p[2] for p in flat], dtype=np.int64)
        return [flat[a:b] for a, b in _chunks(lens, lim)]

    def _send_staged(self, sock: socket.socket, region: np.ndarray, off: np.ndarray, length: np.ndarray) -> None:
        st = self._stage()
        chunks = self._pieces(region, off, length)
        kregions = self._kregions

        def gather(i: int) -> int:
            rr, oo, nn = (np.array(x, dtype=np.int64) for x in zip(*chunks[i]))
            kernels.gather(kregions, rr, oo, nn, out=st.bufs[i % 2], stream=st.stream)
            st.events[i % 2].record(st.stream)
            return int(nn.sum())

        if not chunks:
            return
        st.stream.wait_stream(torch.cuda.current_stream(self.device))
        sizes = [gather(0)]
        for i in range(len(chunks)):
            if i + 1 < len(chunks):
                sizes.append(gather(i + 1))
            st.events[i % 2].synchronize()
            sock.sendall(st.views[i % 2][:sizes[i]])

    def _recv_staged(self, sock: socket.socket, region: np.ndarray, off: np.ndarray, length: np.ndarray) -> None:
        st = self._stage()
        for i, chunk in enumerate(self._pieces(region, off, length)):
            b = i % 2
            st.events[b].synchronize()
            total = sum(p[2] for p in chunk)
            recv_into_exact(sock, st.views[b][:total])
            rr, oo, nn = (np.array(x, dtype=np.int64) for x in zip(*chunk))
            kernels.scatter(st.bufs[b], self._kregions, rr, oo, nn, stream=st.stream)
            st.events[b].record(st.stream)
        st.stream.synchronize()
