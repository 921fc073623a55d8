"""`nccl` backend: payload bytes move with torch.distributed point-to-point ops
(NCCL for CUDA tensors, gloo for CPU tensors) on a two-rank process group built
per peer pair on a private store, after a handshake on the socket control plane.

On CPU tensors (gloo) the data path is native (csrc/c10d, built as p2pkv._c10d): after the
handshake a C++ thread per connection owns the control socket, parses requests, packs and
unpacks chunks and posts and waits on the gloo ops; the caller posts and polls. CUDA tensors
(NCCL) and TLS connections still run on the control plane's Python threads (docs/nccl.md).
Large segments go as views of the registered memory; small ones are packed into chunks.
This module holds the transport, its handshake and the native path; group.py the pair's
process group and its rendezvous, pydata.py the Python data path.
"""
from __future__ import annotations

import datetime
import itertools
import logging
import ssl
import struct
import threading
import uuid
from concurrent.futures import Future
from typing import Any, Sequence

import msgpack
import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport import native as nat
from p2pkv.transport.base import Notif, Peer, PeerClosedError, TransferHandle, advise_hugepages
from p2pkv.transport.chunks import plan_chunks
from p2pkv.transport.control import (MAX_SEGMENTS, Conn, ControlPlaneTransport, check_baseline_args,
                                     parse_address)
from p2pkv.transport.nccl.group import PairGroup, StoreHost, build_group
from p2pkv.transport.nccl.pydata import PythonDataPath
from p2pkv.wire import check_message

try:
    import torch.distributed as dist
    _HAVE_DIST = dist.is_available()
except ImportError:  # pragma: no cover - torch builds without distributed
    dist, _HAVE_DIST = None, False

try:  # imported after torch, whose libraries it links
    from p2pkv import _c10d
    _C10D_MISSING: str | None = None
except ImportError as e:
    _c10d, _C10D_MISSING = None, str(e)

__all__ = ["NcclTransport", "plan_chunks"]

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from a p2pkv checkout, with torch installed "
              "first (pip's build isolation hides torch from setup.py) and a C++17 compiler")

log = logging.getLogger("p2pkv.transport.nccl")

DEFAULT_PACK_THRESHOLD = 512 << 10
DEFAULT_CHUNK_BYTES = 2 << 20
DEFAULT_DEPTH = {"gloo": 2, "nccl": 3}
DEFAULT_SOCKETS = 2
DEFAULT_RECV_WINDOW = 256 << 20


class NcclTransport(PythonDataPath, ControlPlaneTransport):
    """`get_transport("nccl", listen="127.0.0.1:0", timeout=30, auth_token=None,
    pack_threshold=512 KiB, chunk_bytes=2 MiB, depth=None, sockets=2, recv_window_bytes=256 MiB,
    hugepages=True)`.

    Segments of `pack_threshold` bytes or more are sent as views of the KV memory;
    smaller ones are packed into `chunk_bytes` chunks, `depth` of them in flight (None: 2 on
    gloo, 3 on NCCL). On gloo a C++ thread per connection does all of it (p2pkv._c10d); on
    NCCL, and over TLS, Python threads do (there `depth` packing threads on gloo). A gloo pair talks over `sockets` TCP connections (gloo devices), messages
    going round-robin by tag, so two chunks can be on the wire at once. Registered CPU
    memory goes on 2 MiB pages (as tcp's): packing and unpacking walk far fewer page tables.
    The accepting side's settings apply to a connection (both must cut the same
    messages). CPU tensors use gloo, CUDA tensors NCCL; no global process group
    (`init_process_group`) is needed, and none is touched if one exists.
    """

    name = "nccl"

    def __init__(self, *, pack_threshold: int = DEFAULT_PACK_THRESHOLD, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 depth: int | None = None, sockets: int = DEFAULT_SOCKETS,
                 recv_window_bytes: int = DEFAULT_RECV_WINDOW, hugepages: bool = True, **kw: Any):
        if not _HAVE_DIST:
            from p2pkv.transport import BackendUnavailable
            raise BackendUnavailable("backend 'nccl' needs a torch build with torch.distributed "
                                     "(pip install torch from pytorch.org)")
        if _c10d is None:
            from p2pkv.transport import BackendUnavailable
            raise BackendUnavailable(f"backend 'nccl' needs its native data path (p2pkv._c10d), which is not built "
                                     f"for this torch ({_C10D_MISSING}); {BUILD_HINT}")
        pack_threshold, chunk_bytes, sockets = int(pack_threshold), int(chunk_bytes), int(sockets)
        if pack_threshold < 0:
            raise ValueError(f"pack_threshold must be >= 0 bytes, got {pack_threshold}")
        if chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be at least 4096, got {chunk_bytes}")
        if depth is not None and not 1 <= int(depth) <= 64:
            raise ValueError(f"depth (chunks in flight) must be in [1, 64], got {depth}")
        if not 1 <= sockets <= 16:
            raise ValueError(f"sockets (gloo connections per peer pair) must be in [1, 16], got {sockets}")
        self.pack_threshold, self.chunk_bytes, self.sockets = pack_threshold, chunk_bytes, sockets
        self._depth = None if depth is None else int(depth)
        self.hugepages = bool(hugepages)
        self.recv_window_bytes = max(0, int(recv_window_bytes))
        self._stores = StoreHost()
        self._tls = threading.local()
        self._freeing: list[Future] = []
        self._inbox = _c10d.Inbox(64 << 20)
        self._peer_names: dict[int, str] = {}
        self._peer_ids = itertools.count(1)
        super().__init__(**kw)

    # ------------------------------------------------------------------ set-up
    def register(self, tensors: Sequence[torch.Tensor], spec: Any = None) -> Any:
        spec = super().register(tensors, spec)
        dev = self.device
        if dev.type == "cuda" and not hasattr(dist, "ProcessGroupNCCL"):
            from p2pkv.transport import BackendUnavailable
            raise BackendUnavailable("backend 'nccl' on CUDA tensors needs a torch build with NCCL")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'nccl' moves CPU (gloo) or CUDA (NCCL) tensors, not {dev.type}")
        if dev.type == "cpu" and self.hugepages:
            advise_hugepages(self.regions)
        return spec

    @property
    def depth(self) -> int:
        """Chunks in flight on the sender: as set, else the default of this side's process-group backend."""
        return self._depth if self._depth is not None else DEFAULT_DEPTH[self.pg_backend]

    @property
    def pg_backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def _store_address(self) -> str:
        return self._stores.address(self._host, self._td())

    def _td(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout)

    def _hello_extra(self) -> dict[str, Any]:
        nonce = uuid.uuid4().hex
        self._tls.nonce = nonce
        return {"pg_nonce": nonce, "pg_store": self._store_address(), "pg_backend": self.pg_backend,
                "pack_threshold": self.pack_threshold, "chunk_bytes": self.chunk_bytes, "depth": self.depth,
                "sockets": self.sockets, "pg_native": self.pg_backend == "gloo"}

    def _check_peer(self, info: dict[str, Any]) -> None:
        super()._check_peer(info)
        if info.get("pg_backend") != self.pg_backend:
            raise ValueError(f"device mismatch: local tensors use {self.pg_backend} ({self.device.type}), "
                             f"peer's use {info.get('pg_backend')!r}; register KV memory on the same kind of device")
        if not isinstance(info.get("pg_nonce"), str) or not isinstance(info.get("pg_store"), str):
            raise ValueError("peer sent no process-group rendezvous fields (pg_nonce, pg_store)")

    def _on_connect(self, conn: Conn) -> None:
        """Build this pair's own two-rank group: the accepting side hosts the store and is rank 0."""
        info = conn.peer.info
        mine = getattr(self._tls, "nonce", None)
        if conn.initiator:
            rank, prefix = 1, f"p2pkv/{info['pg_nonce']}/{mine}/"
            # The store listens where the control plane does: dial the host we reached it at.
            host, port = parse_address(conn.peer.address)[0], parse_address(info["pg_store"])[1]
            settings = info
        else:
            rank, prefix = 0, f"p2pkv/{mine}/{info['pg_nonce']}/"
            host, port = None, None
            settings = {"pack_threshold": self.pack_threshold, "chunk_bytes": self.chunk_bytes, "depth": self.depth,
                        "sockets": self.sockets}
        try:
            conn.extra["plan"] = (max(0, int(settings["pack_threshold"])), max(4096, int(settings["chunk_bytes"])),
                                  min(64, max(1, int(settings["depth"]))))
            sockets = min(16, max(1, int(settings.get("sockets", 1))))
            conn.extra["sockets"] = sockets if self.pg_backend == "gloo" else 1
            if conn.initiator:
                base = dist.TCPStore(host, port, None, False, self._td())
            else:
                self._store_address()
                base = self._stores.store
            pg = build_group(dist.PrefixStore(prefix, base), rank, self.pg_backend, sockets,
                             conn.sock.getsockname()[0], self._td(), self.device)
        except (KeyError, TypeError, ValueError) as e:
            conn.close()
            raise PeerClosedError(f"bad process-group rendezvous fields from the peer: {e}", peer=conn.peer.name) from None
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError/timeouts here
            conn.close()
            raise PeerClosedError(f"could not build the {self.pg_backend} process group with the peer within "
                                  f"{self.timeout:g} s: {e}", peer=conn.peer.name) from None
        conn.extra["group"] = PairGroup(pg, rank, base if conn.initiator else None, self.pg_backend, self.device)
        log.debug("%s: %s group up with %s (rank %d)", self.local_name, self.pg_backend, conn.peer.name, rank)

    def _on_disconnect(self, conn: Conn) -> None:
        if conn.link is not None:
            conn.link.close()  # joins its thread and lets go of the group first
        group = conn.extra.pop("group", None)
        if group is not None:
            fut = group.close()
            if fut is not None:
                self._freeing = [f for f in self._freeing if not f.done()] + [fut]

    def close(self) -> None:
        super().close()
        for fut in self._freeing:
            try:
                fut.result(timeout=self.timeout)
            except Exception:  # noqa: BLE001 - freeing is best effort; the groups are unusable either way
                log.debug("freeing a process group failed", exc_info=True)
        self._freeing.clear()
        self._stores.close()

    # ------------------------------------------------------------------ native (gloo): csrc/c10d
    def _native(self, conn: Conn) -> bool:
        """Whether this connection's data path is native: gloo, no TLS, and a peer that speaks it."""
        return (self.pg_backend == "gloo" and not isinstance(conn.sock, ssl.SSLSocket)
                and conn.peer.info.get("pg_native") is True)

    def _adopt(self, conn: Conn) -> bool:
        if not self._native(conn):
            return False
        group: PairGroup = conn.extra["group"]
        threshold, chunk_bytes, depth = conn.extra["plan"]
        bases = np.asarray([r.data_ptr() for r in self.regions], "<u8").tobytes()
        sizes = np.asarray([r.nbytes for r in self.regions], "<u8").tobytes()
        settings = (threshold, chunk_bytes, depth, self.recv_window_bytes)
        fd = conn.sock.detach()  # the native link owns and closes the descriptor from here on
        if conn.initiator:
            conn.link = _c10d.Initiator(fd, self.timeout, group.pg, group.peer_rank, *settings, bases, sizes)
        else:
            pid = next(self._peer_ids)
            self._peer_names[pid] = conn.peer.name
            conn.link = _c10d.Server(fd, self.timeout, group.pg, group.peer_rank, *settings, pid, bases, sizes,
                                     self._inbox)
        return True

    def _post(self, conn: Conn, segments: Segments, request_id: str | None, pull: bool,
              note: bytes = b"") -> TransferHandle:
        """Queue a read (pull) or write on the connection's native thread: the peer's rows travel as
        a segment table (unmerged, so both sides cut the same messages), ours as the op's local body;
        `note` is a write's packed notify."""
        mine, theirs = ("dst", "src") if pull else ("src", "dst")
        if len(segments) > MAX_SEGMENTS:
            raise ValueError(f"{len(segments)} segments exceed the limit of {MAX_SEGMENTS} per request: split it")
        Segments.check_bounds(segments.region.astype(np.int64), getattr(segments, mine), segments.length,
                              [r.nbytes for r in self.regions])
        n, nbytes = len(segments), segments.nbytes
        body = nat.request_body(nat.FORM_TABLE, request_id, segments.pack(theirs), n, None, note)
        local = nat.request_body(nat.FORM_TABLE, None, segments.pack(mine), n, None)
        op = conn.link.post(nat.OP_READ if pull else nat.OP_WRITE,
                            nat.frame(nat.DATA_READ if pull else nat.DATA_WRITE, body, nbytes), local, nbytes)
        return nat.NativeHandle(op, conn.peer.name, request_id, nbytes)

    # ------------------------------------------------------------------ calls: native where adopted, else Python
    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        native = self._native_write(peer, segments, request_id, notify, _c10d.MAX_NOTIFY)
        if native is None:
            return super().write(peer, segments, request_id, notify)
        conn, note = native
        return self._post(conn, segments, request_id, pull=False, note=note)

    def send_notif(self, peer: Peer | str, message: dict[str, Any]) -> None:
        """Natively: queued behind earlier transfers to that peer and returns at once; raises only if the
        connection is already down (a later failure shows on the next transfer to that peer)."""
        conn = self._conn(peer)
        if conn.link is None:
            return super().send_notif(peer, message)
        check_message(message, "notification")
        body = msgpack.packb(dict(message), use_bin_type=True)
        if len(body) > _c10d.MAX_NOTIFY:
            raise ValueError(f"notification of {len(body)} bytes exceeds the limit of {_c10d.MAX_NOTIFY}")
        op = conn.link.post(nat.OP_SEND, nat.frame(nat.NOTIF, body), b"", 0)
        if op.done() and op.error() is not None:
            nat.NativeHandle(op, conn.peer.name, None, 0).wait(0)

    def get_notifs(self) -> list[Notif]:
        return super().get_notifs() + nat.drain_messages(self._inbox, self._peer_names, "nccl")

    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        conn = self._conn(peer)
        if conn.link is None:
            return super().baseline(peer, nbytes, iters)
        check_baseline_args(nbytes, iters)
        times = []
        for _ in range(iters):
            op = conn.link.post(nat.OP_BASELINE, nat.frame(nat.BASELINE, struct.pack("<Q", int(nbytes))), b"",
                                int(nbytes))
            nat.NativeHandle(op, conn.peer.name, "baseline", int(nbytes)).wait(self.timeout * 4)
            times.append(op.seconds())
        return min(times)

    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        """Natively (gloo): queued on the connection's C++ thread, which posts every receive before it
        asks P to send. Otherwise as the control plane's read, receives also posted up front.

        A gloo pair's I/O thread holds the pair's lock while bytes stream in, so a receive
        posted mid-stream waits for the stream to pause; posted up front, none waits."""
        conn = self._conn(peer)
        self._check_request(segments, request_id)
        if conn.link is not None:
            return self._post(conn, segments, request_id, pull=True)
        local = [r.nbytes for r in self._require_registered().regions]
        Segments.check_bounds(segments.region.astype(np.int64), segments.dst, segments.length, local)
        return self._read_posted(conn, segments, request_id)
