"""The nccl backend's process groups: one two-rank group per connection (gloo for CPU
tensors, NCCL for CUDA tensors), rendezvousing on a TCPStore the accepting side hosts,
and freed on one non-daemon reaper thread. Nothing here touches a global process group."""
from __future__ import annotations

import datetime
import logging
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from p2pkv.transport.base import off_engine_cpus

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch builds without distributed; the transport refuses to start
    dist = None  # type: ignore[assignment]

__all__ = ["PairGroup", "StoreHost", "build_group", "DIRECT_TAG"]

log = logging.getLogger("p2pkv.transport.nccl")

DIRECT_TAG = 1 << 20  # tags of the segments sent as views: DIRECT_TAG + their index in the request


class PairGroup:
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
            return [op(v, DIRECT_TAG + i) for i, v in enumerate(views)]
        self.pg._start_coalescing(self.device)
        try:
            for i, v in enumerate(views):
                op(v, DIRECT_TAG + i)
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
                _REAPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pkv-nccl-free",
                                             initializer=off_engine_cpus)
            return _REAPER.submit(free)
    except RuntimeError:
        free()
        return None


class StoreHost:
    """The TCPStore this side hosts, on the control plane's host, for the pairs that dial it;
    started at the first handshake that needs it."""

    def __init__(self) -> None:
        self.store: Any = None
        self._port = 0
        self._lock = threading.Lock()

    def address(self, host: str, timeout: datetime.timedelta) -> str:
        """host:port of the store, starting it on `host` first if it is not up."""
        with self._lock:
            if self.store is None:
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.create_server((host, 0), family=fam, backlog=64)
                self._port = sock.getsockname()[1]
                # The store owns (and closes) the listening socket from here on.
                self.store = dist.TCPStore(host, self._port, None, True, timeout,
                                           wait_for_workers=False, master_listen_fd=sock.detach())
            port = self._port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        with self._lock:
            self.store = None


def build_group(store: Any, rank: int, backend: str, sockets: int, local_host: str, timeout: datetime.timedelta,
                device: torch.device) -> Any:
    """The pair's two-rank group on `store` (already prefixed for this pair): gloo over `sockets` TCP
    connections from `local_host`, or NCCL on `device`. Blocks until the peer builds its side."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._threads = 1
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host) for _ in range(sockets)]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return _nccl_group(store, rank, opts, device)


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
