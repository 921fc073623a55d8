"""TCP backend. The data path is native (csrc/net): after the handshake each connection belongs
to a C++ thread that sends a request's block ids and moves the bytes with vectored
`sendmsg`/`recvmsg` straight from and into the registered KV memory (CPU memory, hinted to 2 MiB
pages) or through two pinned staging buffers filled and drained by the GPU (CUDA memory); on the
serving side it parses, checks and serves requests. None of it needs the GIL: the caller posts
and polls. With TLS (which the native path cannot encrypt), or for CUDA memory without p2pkv's
CUDA extension, transfers run on the control plane's Python threads instead."""
from __future__ import annotations

import ctypes
import logging
import socket
import ssl
import struct
from typing import Any, Sequence

import numpy as np
import torch

from p2pkv import kernels
from p2pkv.layout import BlockRows, merge_rows
from p2pkv.segments import Segments
from p2pkv.transport import native as nat
from p2pkv.transport.base import Notif, Peer, TransferHandle, advise_hugepages
from p2pkv.transport.control import Conn, ControlPlaneTransport, LocalRows, check_baseline_args
from p2pkv.wire import recv_into_exact

log = logging.getLogger("p2pkv.transport.tcp")

__all__ = ["TcpTransport", "iovecs"]


def iovecs(bases: np.ndarray, region: np.ndarray, off: np.ndarray, length: np.ndarray) -> np.ndarray:
    """`struct iovec` rows (address, length) as a (n, 2) uintp array, what the kernel
    reads directly, with no Python object per segment (see `merge_rows`)."""
    return merge_rows(bases[region] + off.astype(np.uintp), length.astype(np.uintp))


def _views(iov: np.ndarray) -> list[memoryview]:
    """Memoryviews of the iovec rows, for the path that takes Python buffers (TLS)."""
    return [memoryview((ctypes.c_char * n).from_address(a)).cast("B") for a, n in iov.tolist()]


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
    """`get_transport("tcp", listen="127.0.0.1:0", timeout=30, auth_token=None, staging_bytes=16 MiB,
    sock_buf_bytes=0, hugepages=True)`. `sock_buf_bytes=0` leaves the socket buffers to the kernel's
    autotuning (a fixed 4 MiB measured 0.7-0.8 as fast on loopback, for raw sends too);
    `hugepages=False` leaves registered CPU memory on the pages it has."""

    name = "tcp"
    _native_setup = True

    def __init__(self, *, staging_bytes: int = 16 << 20, sock_buf_bytes: int = 0, hugepages: bool = True,
                 **kw: Any):
        for what, v, lo in (("staging_bytes", staging_bytes, 1 << 16), ("sock_buf_bytes", sock_buf_bytes, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{what} must be an int number of bytes, got {type(v).__name__} {v!r}")
            if v < lo:
                raise ValueError(f"{what} must be at least {lo} bytes, got {v}")
        if not isinstance(hugepages, (bool, int, np.bool_, np.integer)):
            raise TypeError(f"hugepages must be True or False, got {type(hugepages).__name__} {hugepages!r}")
        self._links = nat.NativeLinks("tcp", float(kw.get("timeout", 30.0)))
        self._nat = self._links.mod
        self._mem: Any = None
        self._api: int | None = None
        super().__init__(**kw)
        self.staging_bytes = int(staging_bytes)
        self.sock_buf_bytes = int(sock_buf_bytes)
        self.hugepages = bool(hugepages)
        self._bases = np.zeros(0, dtype=np.uintp)
        self._staging: _Staging | None = None
        self._bbuf: memoryview | None = None

    def register(self, tensors: Sequence[torch.Tensor], spec: Any = None) -> Any:
        spec = super().register(tensors, spec)
        self._bases = np.array([r.data_ptr() for r in self.regions], dtype=np.uintp)
        if self.device.type == "cpu" and self.hugepages:
            advise_hugepages(self.regions)
        self._mem = self._geometry(None, "src")
        if self._direct_memory():
            sizes = np.asarray([r.nbytes for r in self.spec.regions], "<u8")  # type: ignore[union-attr]
            self._gate.serve(self._bases.astype("<u8").tobytes(), sizes.tobytes(), self._links.inbox, self._links.held,
                             *self._staging_args(), min(self.sock_buf_bytes, 1 << 30))
            self._links.adopt = self._gate.take_accepted
        self._configure_handshake()
        return spec

    def _direct_memory(self) -> bool:
        """Whether the registered memory can move natively: host memory, or a built CUDA extension."""
        return self.device.type == "cpu" or (self.device.type == "cuda" and bool(self._cuda_api))

    def _name_served(self, pid: int, peer: str) -> None:
        self._links.name(pid, peer)

    def _staging_args(self) -> tuple[int, int, int]:
        """(CUDA call table, device, staging bytes) for a native link over device memory; zeros for host memory."""
        if self.device.type != "cuda":
            return 0, -1, 0
        return self._cuda_api, int(self.device.index or 0), self.staging_bytes

    @property
    def _cuda_api(self) -> int:
        """The CUDA extension's call table for native staging; 0 where it cannot be built (then CUDA
        transfers run on the control plane's Python threads, and a warning says why)."""
        if self._api is None:
            ext = kernels.load()
            self._api = int(ext.native_api()) if ext is not None and hasattr(ext, "native_api") else 0
            if not self._api:
                log.warning("tcp: CUDA tensors move on Python threads (slower with a busy engine): the p2pkv CUDA "
                            "extension is unavailable (%s)", kernels.unavailable_reason())
        return self._api

    # ---------------------------------------------------------------- the native data path (CPU, no TLS)
    def _geometry(self, rows: BlockRows | None, side: str) -> Any:
        """This side's native geometry for a spec pair (None: only the regions, for segment tables)."""
        sizes = [r.nbytes for r in self.spec.regions]  # type: ignore[union-attr]
        if rows is None:
            n = len(sizes)
            z = np.zeros(n, dtype="<u8").tobytes()
            return self._nat.Geometry(self._bases.astype("<u8").tobytes(), np.asarray(sizes, "<u8").tobytes(), z, 0,
                                      np.zeros(n + 1, "<u4").tobytes(), b"", b"")
        return nat.geometry(rows, side, self._bases, sizes)

    def _adopt(self, conn: Conn) -> bool:
        if not self._direct(conn):
            return False
        if conn.initiator:
            conn.link = self._links.initiator(conn.sock, *self._staging_args())
            return True
        assert self.spec is not None
        # block geometries come from the dialling side (GEOMETRY frames), as on natively served links
        conn.link = self._links.server(conn.sock, conn.peer.name, self._bases, [r.nbytes for r in self.spec.regions],
                                       None, None, *self._staging_args())
        return True

    def _local_geometry(self, conn: Conn, rows: LocalRows, pull: bool) -> tuple[Any, bytes]:
        """The native geometry and body of this side's rows of a request."""
        if rows.blocks is None:
            region, off, length = rows.arrays()
            table = np.stack([region.astype("<i8"), off.astype("<i8"), length.astype("<i8")], axis=1).tobytes()
            return self._mem, nat.request_body(nat.FORM_TABLE, None, table, len(length), None)
        geo_rows, ids, _, regions = rows.blocks
        key = ("native", pull)
        hit = conn.extra.get(key)
        if hit is None or hit[0] is not geo_rows:
            # the peer's rows of this pair go first, on the same ordered link: it serves by them
            body = nat.geometry_body(geo_rows, "src" if pull else "dst", write=not pull)
            conn.link.post(nat.OP_SEND, nat.frame(nat.GEOMETRY, body), None, None, 0)
            hit = conn.extra[key] = (geo_rows, self._geometry(geo_rows, "dst" if pull else "src"))
        return hit[1], nat.request_body(nat.FORM_BLOCKS, None, np.asarray(ids, "<i8").tobytes(), len(ids), regions)

    def _post(self, conn: Conn, segments: Segments, request_id: str | None, pull: bool,
              note: bytes = b"", held: bool = False) -> TransferHandle:
        """Post a read or write on the connection's native link; `note` is a write's packed notify."""
        rows, nbytes, meta = self._request(conn, segments, pull)
        geo, local = self._local_geometry(conn, rows, pull)
        flags = nat.FLAG_HELD if held else 0
        if "blocks" in meta:
            theirs = meta["blocks"]
            body = nat.request_body(nat.FORM_BLOCKS, request_id, theirs, len(theirs) // 8, meta["regions"], note, flags)
        else:
            body = nat.request_body(nat.FORM_TABLE, request_id, meta["segs"], len(meta["segs"]) // 24, None, note, flags)
        op = conn.link.post(nat.OP_READ if pull else nat.OP_WRITE,
                            nat.frame(nat.DATA_READ if pull else nat.DATA_WRITE, body, nbytes), local, geo, nbytes)
        return nat.NativeHandle(op, conn.peer.name, request_id, nbytes)

    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        conn = self._conn(peer)
        if conn.link is None:
            return super().read(peer, segments, request_id)
        self._check_request(segments, request_id)
        return self._post(conn, segments, request_id, pull=True)

    @property
    def holds_reads(self) -> bool:  # type: ignore[override]
        """Held reads are checked by the native server; TLS connections have none."""
        return self._tls_client is None

    def read_held(self, peer: Peer | str, segments: Segments, request_id: str) -> TransferHandle:
        conn = self._conn(peer)
        if conn.link is None:
            raise NotImplementedError("held reads need the native data path (not TLS)")
        self._check_request(segments, request_id)
        if not request_id:
            raise ValueError("a held read names the request it reads (request_id)")
        return self._post(conn, segments, request_id, pull=True, held=True)

    def hold(self, request_id: str) -> None:
        self._links.held.hold(request_id)

    def unhold(self, request_id: str) -> bool:
        return self._links.held.unhold(request_id)

    def serving(self, request_id: str) -> bool:
        return self._links.held.serving(request_id)

    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        native = self._native_write(peer, segments, request_id, notify, self._nat.MAX_NOTIFY)
        if native is None:
            return super().write(peer, segments, request_id, notify)
        conn, note = native
        return self._post(conn, segments, request_id, pull=False, note=note)

    @property
    def send_notif_blocks(self) -> bool:  # type: ignore[override]
        """Natively a message is only queued; with TLS the control plane's Python thread sends it."""
        return self._tls_client is not None

    def send_notif(self, peer: Peer | str, message: dict[str, Any]) -> None:
        """Natively: queued behind earlier transfers to that peer and returns at once; raises only if the
        connection is already down (a later failure shows on the next transfer to that peer)."""
        conn = self._conn(peer)
        if conn.link is None:
            return super().send_notif(peer, message)
        self._links.send_notif(conn.link, conn.peer.name, message)

    def get_notifs(self) -> list[Notif]:
        return super().get_notifs() + self._links.notifs()

    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        conn = self._conn(peer)
        if conn.link is None:
            return super().baseline(peer, nbytes, iters)
        check_baseline_args(nbytes, iters)
        buf = self._baseline_buf(int(nbytes))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        times = []
        for _ in range(iters):
            op = conn.link.post(nat.OP_BASELINE, nat.frame(nat.BASELINE, struct.pack("<Q", int(nbytes))), None, None,
                                int(nbytes), addr, int(nbytes))
            nat.NativeHandle(op, conn.peer.name, "baseline", int(nbytes)).wait(self.timeout * 4)
            times.append(op.seconds())
        return min(times)

    def _on_connect(self, conn: Conn) -> None:
        if self.sock_buf_bytes <= 0:
            return
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, opt, self.sock_buf_bytes)
            except OSError:
                pass

    def _iov(self, region: np.ndarray, off: np.ndarray, length: np.ndarray) -> np.ndarray:
        """The iovec rows of local segments, checked against the registered regions first
        (the kernel gets raw addresses, so no segment may point outside them)."""
        Segments.check_bounds(region, off, length, [r.nbytes for r in self.regions])
        return iovecs(self._bases, region, off, length)

    def _direct(self, conn: Conn) -> bool:
        """Whether this connection's data path is native: not TLS, and host memory or a built CUDA extension."""
        if isinstance(conn.sock, ssl.SSLSocket):
            return False
        return self._direct_memory()

    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        if self.device.type != "cpu":
            self._send_staged(conn.sock, region, off, length)
        else:  # TLS: the native path cannot encrypt
            for v in _views(self._iov(region, off, length)):
                conn.sock.sendall(v)

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        if self.device.type != "cpu":
            self._recv_staged(conn.sock, region, off, length)
        else:
            for v in _views(self._iov(region, off, length)):
                recv_into_exact(conn.sock, v)

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
