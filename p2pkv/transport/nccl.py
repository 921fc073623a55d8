"""`nccl` backend: payload bytes move with torch.distributed point-to-point ops
(NCCL for CUDA tensors, gloo for CPU tensors) on a two-rank process group built
per peer pair on a private store, after a handshake on the socket control plane.

On CPU tensors (gloo) the data path is native (csrc/c10d, built as p2pkv._c10d): after the
handshake a C++ thread per connection owns the control socket, parses requests, packs and
unpacks chunks and posts and waits on the gloo ops; the caller posts and polls. CUDA tensors
(NCCL) and TLS connections still run on the control plane's Python threads (docs/nccl.md).
Large segments go as views of the registered memory; small ones are packed into chunks.
"""
from __future__ import annotations

import datetime
import itertools
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
import torch

from p2pkv.segments import Segments
from p2pkv.transport import native as nat
from p2pkv.transport.base import (Notif, Peer, PeerClosedError, TransferError, TransferHandle, TransferTimeout,
                                  advise_hugepages)
from p2pkv.transport.chunks import Packer, plan_chunks
from p2pkv.transport.control import (MAX_SEGMENTS, Conn, ControlPlaneTransport, check_baseline_args,
                                     parse_address)
from p2pkv.wire import FrameType, check_message, send_frame

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
_DIRECT_TAG = 1 << 20
_BASELINE_TAG = 1 << 24
_RDHUP = getattr(select, "POLLRDHUP", 0)


class _PairGroup:
    """A two-rank process group for one connection: `rank` is ours, `1 - rank` the peer's."""

    def __init__(self, pg: Any, rank: int, store: Any, backend: str, device: torch.device):
        self.pg, self.rank, self.store, self.backend, self.device = pg, rank, store, backend, device
        self.peer_rank = 1 - rank
        self.bufs: dict[str, list[torch.Tensor]] = {}
        self.baseline: torch.Tensor | None = None

    def send(self, t: torch.Tensor, tag: int) -> Any:
        return self.pg.send([t], self.peer_rank, tag)

    def recv(self, t: torch.Tensor, tag: int) -> Any:
        return self.pg.recv([t], self.peer_rank, tag)

    def post(self, views: list[torch.Tensor], recv: bool) -> list[Any]:
        """Send or receive each view. On NCCL they go as one group (one launch, one work), as torch's
        `batch_isend_irecv` does; on gloo that call is a plain loop of sends, so this posts each."""
        op = self.recv if recv else self.send
        if self.backend != "nccl" or len(views) < 2:
            return [op(v, _DIRECT_TAG + i) for i, v in enumerate(views)]
        self.pg._start_coalescing(self.device)
        try:
            for i, v in enumerate(views):
                op(v, _DIRECT_TAG + i)
        finally:
            work = self.pg._end_coalescing(self.device)
        return [work]

    def staging(self, kind: str, count: int, nbytes: int) -> list[torch.Tensor]:
        """`count` buffers of at least `nbytes` for sending or receiving, reused across transfers of this pair."""
        bufs = self.bufs.get(kind, [])
        if len(bufs) < count or bufs[0].numel() < nbytes:
            bufs = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(count)]
            self.bufs[kind] = bufs
        return bufs[:count]

    def close(self) -> Future | None:
        """Drop the group (later ops fail with PeerClosedError) and free it on the reaper thread."""
        self.bufs, self.baseline = {}, None
        held, self.pg, self.store = [self.pg, self.store], None, None
        return _dispose(held, self.backend) if held[0] is not None else None


class _Incoming:
    """Receives posted for one transfer: the direct views' works, and the chunk ring."""

    def __init__(self, works: list[Any]):
        self.works = works
        self.packer: Packer | None = None
        self.bufs: list[torch.Tensor] = []
        self.posted: list[Any] = []
        self.workers = 1  # unpacking threads; len(bufs) is a multiple of it wherever buffers are re-posted


_REAPER: ThreadPoolExecutor | None = None
_REAPER_LOCK = threading.Lock()


def _dispose(held: list[Any], backend: str) -> Future | None:
    """Free a process group (and its store client) on one non-daemon thread.

    Their destructors release and retake the GIL; on a daemon thread (where the control
    plane notices disconnects) that can overlap interpreter shutdown, which ends the
    thread mid-destructor and aborts the process. The executor's worker is joined at
    exit instead."""
    def free() -> None:
        if backend == "nccl" and held and held[0] is not None:
            try:
                held[0].abort()
            except Exception:  # noqa: BLE001 - best effort on a group that may already be broken
                log.debug("aborting the NCCL group failed", exc_info=True)
        held.clear()

    global _REAPER
    try:
        with _REAPER_LOCK:
            if _REAPER is None:
                _REAPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pkv-nccl-free")
            return _REAPER.submit(free)
    except RuntimeError:
        free()
        return None


def _nccl_group(store: Any, rank: int, opts: Any, device: torch.device) -> Any:
    """A two-rank ProcessGroup over one NCCL backend, put together as `init_process_group` does:
    grouping many sends into one NCCL group (`_start_coalescing`) is defined on the group, not the backend.

    The communicator and its point-to-point connections both ways are made now, while both sides are
    in the handshake (one byte each way). Made lazily, D's first op (posting its receives before it
    asks P to send) would wait for P's side of the NCCL set-up, which P does only at its own first op,
    after D's request: a deadlock until the timeout."""
    nccl = dist.ProcessGroupNCCL(store, rank, 2, opts)
    dev = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    nccl.eager_connect_single_device(dev)
    pg = dist.ProcessGroup(store, rank, 2)
    kind = dist.ProcessGroup.BackendType.NCCL
    pg._set_default_backend(kind)
    nccl._set_sequence_number_for_group()
    pg._register_backend(torch.device("cuda"), kind, nccl)
    out, back = torch.zeros(1, dtype=torch.uint8, device=dev), torch.empty(1, dtype=torch.uint8, device=dev)
    pg._start_coalescing(dev)
    pg.send([out], 1 - rank, 0)
    pg.recv([back], 1 - rank, 0)
    pg._end_coalescing(dev).wait(opts._timeout)
    return pg


def _fan_out(work: Callable[[int, list[BaseException]], None], workers: int, name: str) -> None:
    """Run work(k, failed) for k in range(workers): k = 0 on this thread, the rest on helpers.
    The first exception is re-raised here; `failed` lets the others stop early."""
    failed: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k, failed)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            failed.append(e)
    helpers = [threading.Thread(target=run, args=(k,), name=name, daemon=True) for k in range(1, workers)]
    for h in helpers:
        h.start()
    run(0)
    for h in helpers:
        h.join()
    if failed:
        raise failed[0]


class NcclTransport(ControlPlaneTransport):
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
        self._store: Any = None
        self._store_port = 0
        self._store_lock = threading.Lock()
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
        """Start (once) the TCPStore this side hosts for pairs that dial it, on the control plane's host."""
        with self._store_lock:
            if self._store is None:
                fam = socket.AF_INET6 if ":" in self._host else socket.AF_INET
                sock = socket.create_server((self._host, 0), family=fam, backlog=64)
                self._store_port = sock.getsockname()[1]
                # The store owns (and closes) the listening socket from here on.
                self._store = dist.TCPStore(self._host, self._store_port, None, True, self._td(),
                                            wait_for_workers=False, master_listen_fd=sock.detach())
            port = self._store_port
        return f"[{self._host}]:{port}" if ":" in self._host else f"{self._host}:{port}"

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
                base = self._store
            store = dist.PrefixStore(prefix, base)
            local_host = conn.sock.getsockname()[0]
            if self.pg_backend == "gloo":
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = self._td()
                opts._threads = 1
                opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host) for _ in range(sockets)]
                pg = dist.ProcessGroupGloo(store, rank, 2, opts)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = self._td()
                pg = _nccl_group(store, rank, opts, self.device)
        except (KeyError, TypeError, ValueError) as e:
            conn.close()
            raise PeerClosedError(f"bad process-group rendezvous fields from the peer: {e}", peer=conn.peer.name) from None
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError/timeouts here
            conn.close()
            raise PeerClosedError(f"could not build the {self.pg_backend} process group with the peer within "
                                  f"{self.timeout:g} s: {e}", peer=conn.peer.name) from None
        conn.extra["group"] = _PairGroup(pg, rank, base if conn.initiator else None, self.pg_backend, self.device)
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
        with self._store_lock:
            self._store = None

    # ------------------------------------------------------------------ data path
    def _group(self, conn: Conn, request_id: Any) -> _PairGroup:
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

    def _send_packed_gloo(self, conn: Conn, group: _PairGroup, packer: Packer, depth: int, request_id: Any) -> None:
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

    def _send_packed(self, conn: Conn, group: _PairGroup, packer: Packer, depth: int, request_id: Any) -> None:
        """NCCL: this thread packs chunk i+1 while a helper thread posts chunk i and waits for
        it, in order (NCCL matches point-to-point messages by order, not by tag)."""
        bufs = group.staging("send", depth, max(packer.sizes))
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for b in range(depth):
            free.put(b)
        failed: list[BaseException] = []

        def post() -> None:
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

    def _recv_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        self._finish_recvs(conn, self._post_recvs(conn, region, off, length, request_id), request_id)

    # ------------------------------------------------------------------ native (gloo): csrc/c10d
    def _native(self, conn: Conn) -> bool:
        """Whether this connection's data path is native: gloo, no TLS, and a peer that speaks it."""
        return (self.pg_backend == "gloo" and not isinstance(conn.sock, ssl.SSLSocket)
                and conn.peer.info.get("pg_native") is True)

    def _adopt(self, conn: Conn) -> bool:
        if not self._native(conn):
            return False
        group: _PairGroup = conn.extra["group"]
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
              notify: dict[str, Any] | None = None) -> TransferHandle:
        """Queue a read (pull) or write on the connection's native thread: the peer's rows travel as
        a segment table (unmerged, so both sides cut the same messages), ours as the op's local body."""
        mine, theirs = ("dst", "src") if pull else ("src", "dst")
        if len(segments) > MAX_SEGMENTS:
            raise ValueError(f"{len(segments)} segments exceed the limit of {MAX_SEGMENTS} per request: split it")
        Segments.check_bounds(segments.region.astype(np.int64), getattr(segments, mine), segments.length,
                              [r.nbytes for r in self.regions])
        note = b"" if notify is None else msgpack.packb(notify, use_bin_type=True)
        if len(note) > _c10d.MAX_NOTIFY:
            raise ValueError(f"notify message exceeds the limit of {_c10d.MAX_NOTIFY} bytes")
        n, nbytes = len(segments), segments.nbytes
        body = nat.request_body(nat.FORM_TABLE, request_id, segments.pack(theirs), n, None, note)
        local = nat.request_body(nat.FORM_TABLE, None, segments.pack(mine), n, None)
        op = conn.link.post(nat.OP_READ if pull else nat.OP_WRITE,
                            nat.frame(nat.DATA_READ if pull else nat.DATA_WRITE, body, nbytes), local, nbytes)
        return nat.NativeHandle(op, conn.peer.name, request_id, nbytes)

    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        conn = self._conn(peer)
        if conn.link is None:
            return super().write(peer, segments, request_id, notify)
        self._check_request(segments, request_id, notify)
        return self._post(conn, segments, request_id, pull=False, notify=notify)

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

    # ------------------------------------------------------------------ Python data path (NCCL on CUDA, TLS)
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

        def run(c: Conn) -> None:
            incoming = self._post_recvs(c, segments.region, segments.dst, segments.length, request_id)
            send_frame(c.sock, FrameType.READ, {"req": request_id, "segs": segments.pack("src")},
                       payload_len=segments.nbytes)
            self._expect_ack(c)
            self._finish_recvs(c, incoming, request_id)
        return self._submit(conn, run, request_id, segments.nbytes)

    def _post_recvs(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray,
                    request_id: Any) -> "_Incoming":
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

    def _finish_recvs(self, conn: Conn, inc: "_Incoming", request_id: Any) -> None:
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
    def _baseline_buf(self, group: _PairGroup, nbytes: int) -> torch.Tensor:
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
