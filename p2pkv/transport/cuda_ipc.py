"""cuda_ipc backend: P and D on one host (one GPU, or two with peer access). At the
handshake each side exports CUDA IPC handles of its registered KV memory and an IPC
event once; a transfer is then one kernel launch by the side that calls it (D pulls
with `read`, P pushes with `write`), ordered after the peer's last "ready" mark by a
device-side wait on its IPC event. The control socket carries only the handshake and
notifications, on a native link after the handshake (a push's notify leaves once its copy's
event completed, from the link's C++ thread); no payload byte leaves the GPU, and no Python
thread of p2pkv is on a transfer's path."""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from p2pkv import kernels
from p2pkv.layout import KVCacheSpec, block_geometry
from p2pkv.segments import Segments
from p2pkv.transport import BackendUnavailable
from p2pkv.transport import native as nat
from p2pkv.transport.base import Notif, Peer, PeerClosedError, TransferError, TransferHandle, TransferTimeout
from p2pkv.transport.control import Conn, ControlPlaneTransport
from p2pkv.wire import FrameType, send_frame

__all__ = ["CudaIpcTransport", "host_id"]

log = logging.getLogger("p2pkv.transport.cuda_ipc")

# The caller's current stream as a raw handle, without building a Stream object on every transfer.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def host_id() -> str:
    """This machine's identity for the same-host check: hostname plus the kernel's boot id
    (P2PKV_HOST_ID overrides it, e.g. to test the different-host refusal)."""
    if os.environ.get("P2PKV_HOST_ID"):
        return os.environ["P2PKV_HOST_ID"]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


class _Mappings:
    """Process-wide map of opened IPC memory handles with reference counts: a handle may be
    opened only once per process, and is closed when its last user goes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[bytes, list[int]] = {}

    def acquire(self, ext: Any, handle: bytes) -> int:
        with self.lock:
            entry = self.open.get(handle)
            if entry is None:
                entry = self.open[handle] = [ext.ipc_open(handle), 0]
            entry[1] += 1
            return entry[0]

    def release(self, ext: Any, handle: bytes) -> None:
        with self.lock:
            entry = self.open.get(handle)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self.open[handle]
                ext.ipc_close(entry[0])


_MAPPINGS = _Mappings()


class _CudaHandle(TransferHandle):
    """A transfer that is one kernel on a stream: `done()` queries its CUDA event, `wait()` waits on
    it in the extension without the GIL; nothing else runs for it to complete."""

    def __init__(self, peer: str, request_id: str | None, nbytes: int, event: torch.cuda.Event, ext: Any):
        self._set_fields(peer, request_id, nbytes)
        self._cuda_event, self._ext = event, ext
        self._complete = False

    def done(self) -> bool:
        if not self._complete and self._cuda_event.query():
            self._complete = True
        return self._complete

    def wait(self, timeout: float | None = None) -> None:
        """Waits in the extension, without the GIL: spinning briefly, then yielding, then sleeping."""
        if not self._complete:
            if not self._ext.wait_event(self._cuda_event.cuda_event, -1.0 if timeout is None else timeout):
                raise TransferTimeout(f"kernel not finished after {timeout:.3g} s", peer=self.peer,
                                      request_id=self.request_id)
            self._complete = True





class CudaIpcTransport(ControlPlaneTransport):
    """`get_transport("cuda_ipc", listen="127.0.0.1:0", timeout=30, auth_token=None)`; needs CUDA and
    the p2pkv CUDA extension (built at first use when nvcc is there)."""

    name = "cuda_ipc"
    _native_setup = True

    def __init__(self, **kw: Any):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"cuda_ipc needs a CUDA GPU, and torch {torch.__version__} sees none here; "
                                     "between CPU processes use 'tcp' (or 'nccl', which runs on gloo for CPU tensors)")
        self._ext = kernels.load()
        if self._ext is None:
            raise BackendUnavailable("cuda_ipc needs the p2pkv CUDA extension, which could not be built or loaded: "
                                     f"{kernels.unavailable_reason()}; install the CUDA toolkit (nvcc) and ninja, "
                                     "or build it ahead of time with `python -m p2pkv.kernels build`")
        self._api = int(self._ext.native_api())
        self._links = nat.NativeLinks("cuda_ipc", float(kw.get("timeout", 30.0)))
        super().__init__(**kw)
        self._host = host_id()
        self._allocs: list[dict[str, Any]] = []
        self._region_map: list[list[int]] = []
        self._local: kernels.Regions | None = None
        self._ready: torch.cuda.Event | None = None
        self._baseline_buf: torch.Tensor | None = None

    # ------------------------------------------------------------------ registration and handshake
    def register(self, tensors: Sequence[torch.Tensor], spec: KVCacheSpec | None = None) -> KVCacheSpec:
        tensors = list(tensors)
        devs = {str(t.device) for t in tensors}
        if any(t.device.type != "cuda" for t in tensors):
            raise ValueError(f"cuda_ipc registers CUDA tensors only; got tensors on {sorted(devs)} "
                             "(use 'tcp' for host memory)")
        spec = super().register(tensors, spec)
        with torch.cuda.device(self.device):
            allocs: dict[int, int] = {}
            self._allocs, self._region_map = [], []
            for r in self.regions:
                ptr = r.data_ptr()
                try:
                    handle, base, size = self._ext.ipc_export(ptr)
                except RuntimeError as e:
                    raise ValueError(f"cuda_ipc cannot export the KV memory at {ptr:#x} on {self.device}: {e} "
                                     "(memory from torch's caching allocator or cudaMalloc works; expandable "
                                     "segments and cuMemCreate pools do not)") from None
                if base not in allocs:
                    allocs[base] = len(self._allocs)
                    self._allocs.append({"handle": handle, "base": base, "size": size})
                self._region_map.append([allocs[base], ptr - base, r.numel(), ptr])
            self._local = kernels.Regions.of(self.regions)
            stream = torch.cuda.current_stream(self.device)
            self._ready = torch.cuda.Event(interprocess=True)
            self._ready.record(stream)
            self._done_events = [torch.cuda.Event() for _ in range(256)]
            for ev in self._done_events:  # creates them now, so a transfer only records one
                ev.record(stream)
            self._done_ptrs = [ev.cuda_event for ev in self._done_events]
            self._next_done = 0
        self._configure_handshake()
        return spec

    def _hello_extra(self) -> dict[str, Any]:
        assert self._ready is not None
        props = torch.cuda.get_device_properties(self.device)
        return {"host": self._host, "pid": os.getpid(), "device_uuid": str(props.uuid), "device_name": props.name,
                "allocs": [{"handle": a["handle"], "size": a["size"]} for a in self._allocs],
                "regions": self._region_map, "event": bytes(self._ready.ipc_handle())}

    def _peer_device(self, info: dict[str, Any]) -> int:
        uuid = info.get("device_uuid")
        for i in range(torch.cuda.device_count()):
            if str(torch.cuda.get_device_properties(i).uuid) == uuid:
                return i
        raise ValueError(f"cuda_ipc: the peer's GPU {info.get('device_name', '?')} ({uuid}) is not visible in this "
                         f"process (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); both "
                         "processes must see each other's GPU")

    def _check_peer(self, info: dict[str, Any]) -> None:
        super()._check_peer(info)
        if info.get("host") != self._host:
            raise ValueError(f"cuda_ipc needs P and D on one host: local host {self._host!r}, peer host "
                             f"{info.get('host')!r}; use 'tcp', 'ucx' or 'nccl' between hosts")
        peer_dev = self._peer_device(info)
        local = self.device.index
        if peer_dev != local and not torch.cuda.can_device_access_peer(local, peer_dev):
            raise ValueError(f"cuda_ipc: GPU {local} here cannot access the peer's GPU {peer_dev} (no peer access "
                             "between them); use 'nccl' or 'tcp'")
        allocs, regions = info.get("allocs"), info.get("regions")
        if not isinstance(allocs, list) or not isinstance(regions, list) or len(regions) != len(self.regions):
            raise ValueError("cuda_ipc: the peer's handshake lacks its IPC handles or region table")
        for i, entry in enumerate(regions):
            a, off, nbytes = int(entry[0]), int(entry[1]), int(entry[2])
            if not 0 <= a < len(allocs) or off < 0 or off + nbytes > int(allocs[a]["size"]):
                raise ValueError(f"cuda_ipc: the peer's region {i} does not lie inside the memory it exported")

    def _on_connect(self, conn: Conn) -> None:
        info = conn.peer.info
        same_process = info.get("pid") == os.getpid()
        handles: list[bytes] = []
        try:
            with torch.cuda.device(self.device):
                if same_process:
                    ptrs = [int(r[3]) for r in info["regions"]]
                else:
                    bases = []
                    for a in info["allocs"]:
                        bases.append(_MAPPINGS.acquire(self._ext, bytes(a["handle"])))
                        handles.append(bytes(a["handle"]))
                    ptrs = [bases[int(r[0])] + int(r[1]) for r in info["regions"]]
                    conn.extra["peer_alloc_bases"] = bases
                conn.extra["peer"] = kernels.Regions.from_ptrs(ptrs, [int(r[2]) for r in info["regions"]], self.device)
                conn.extra["handles"] = handles
                ev = None if same_process else torch.cuda.Event.from_ipc_handle(self.device, bytes(info["event"]))
                conn.extra["event"] = ev
                conn.extra["event_ptr"] = ev.cuda_event if ev is not None else 0
        except Exception as e:
            for h in handles:
                _MAPPINGS.release(self._ext, h)
            conn.close()
            raise PeerClosedError(f"cuda_ipc cannot map the peer's KV memory: {e}", peer=conn.peer.name) from None

    def _on_disconnect(self, conn: Conn) -> None:
        for key in [k for k in conn.extra if k in ("fast_pull", "fast_push") or isinstance(k, tuple)]:
            del conn.extra[key]
        handles = conn.extra.pop("handles", [])
        conn.extra.pop("peer", None)
        conn.extra.pop("event", None)
        conn.extra.pop("event_ptr", None)
        if handles:
            with torch.cuda.device(self.device):
                torch.cuda.current_stream(self.device).synchronize()
                for h in handles:
                    _MAPPINGS.release(self._ext, h)

    # ------------------------------------------------------------------ transfers
    def _send_data(self, conn: Conn, region: np.ndarray, off: np.ndarray, length: np.ndarray, request_id: Any) -> None:
        raise TransferError("cuda_ipc moves no payload over the control socket", peer=conn.peer.name,
                            request_id=request_id)

    _recv_data = _send_data

    def mark_ready(self) -> None:
        """Record "my KV writes so far are done" on the current stream; the peer's next copy waits for it on
        the device (also done by `send_notif`, so a notif that says "blocks ready" carries the ordering)."""
        assert self._ready is not None
        self._ready.record(torch.cuda.current_stream(self.device))

    def _adopt(self, conn: Conn) -> bool:
        """After the handshake the control socket belongs to a native link: the dialling side's sends
        notifications (and notices a peer that went away while idle), the accepting side's collects them."""
        if isinstance(conn.sock, ssl.SSLSocket):
            return False
        conn.link = self._links.initiator(conn.sock) if conn.initiator else self._links.server(conn.sock, conn.peer.name)
        return True

    def get_notifs(self) -> list[Notif]:
        return super().get_notifs() + self._links.notifs()

    def _live(self, peer: Peer | str) -> Conn:
        conn = self._conn(peer)
        if not conn.up and conn.dead is None:  # its native link saw the peer go: unmap its memory now
            self._drop(conn, PeerClosedError(conn.link.reason(), peer=conn.peer.name))
        if conn.dead is not None or "peer" not in conn.extra:
            raise PeerClosedError(f"connection is down ({conn.dead})", peer=conn.peer.name)
        return conn

    def _launch(self, conn: Conn, segments: Segments, pull: bool, request_id: str | None
                ) -> tuple[torch.cuda.Event, int]:
        """One call into the extension on the caller's stream: wait for the peer's ready event, copy, record a
        completion event. Those come from a ring of 256, so a handle older than 256 transfers reports the end
        of a later one (late, never early). A request planned from block ids (`segments.plan`) whose specs
        were seen before takes the short path: its launch arguments are kept with the connection, so the
        host does one dict lookup and one call before the copy starts. Returns the event and the bytes moved."""
        plan = segments.plan
        if plan is not None:
            key = ("fast_pull" if pull else "fast_push") if plan.regions is None else (pull, plan.regions)
        if plan is not None and _raw_stream is not None:
            fast = conn.extra.get(key)
            if (fast is not None and fast[0] is plan.src_spec and fast[1] is plan.dst_spec
                    and fast[2] == kernels.TUNING.version):
                i = self._next_done
                self._next_done = (i + 1) % len(self._done_events)
                try:
                    nbytes = fast[3](plan.src_blocks, plan.dst_blocks, _raw_stream(fast[4]), self._done_ptrs[i])
                except ValueError as e:
                    raise ValueError(f"request {request_id!r} with peer {conn.peer.name}: {e}") from None
                return self._done_events[i], nbytes
        if self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self._launch(conn, segments, pull, request_id)
        peer_regions: kernels.Regions = conn.extra["peer"]
        src, dst = (peer_regions, self._local) if pull else (self._local, peer_regions)
        done = self._done_events[self._next_done]
        self._next_done = (self._next_done + 1) % len(self._done_events)
        idx = self.device.index
        stream_ptr = _raw_stream(idx) if _raw_stream is not None else torch.cuda.current_stream(self.device).cuda_stream
        if plan is not None and kernels.TUNING["blocks"]:
            table = self._block_table(conn, plan, src, dst, pull)
            if table is not None:
                try:
                    kernels.launch_blocks(table, plan.src_blocks, plan.dst_blocks, stream_ptr,
                                          wait_event=conn.extra["event_ptr"], done_event=done.cuda_event)
                except ValueError as e:
                    raise ValueError(f"request {request_id!r} with peer {conn.peer.name}: {e}") from None
                # the table rides along: its device rows must outlive the arguments that point at them
                conn.extra[key] = (plan.src_spec, plan.dst_spec, kernels.TUNING.version,
                                   self._copier(kernels.block_args(table), conn.extra["event_ptr"], idx), idx, table)
                return done, segments.nbytes
        try:
            kernels.launch(src, dst, segments.region, segments.src, segments.dst, segments.length, stream_ptr,
                           wait_event=conn.extra["event_ptr"], done_event=done.cuda_event)
        except ValueError as e:
            side = "peer's" if pull else "local"
            raise ValueError(f"request {request_id!r} with peer {conn.peer.name}: {e} (source = {side} regions)") from None
        return done, segments.nbytes

    def _copier(self, args: tuple, wait_event: int, device: int) -> Any:
        """The extension's copy_blocks with this peer's arguments bound: called per request with the block
        ids, the stream and the done event only."""
        bound = getattr(self._ext, "BlockCopier", None)
        if bound is not None:
            return bound(*args, wait_event, device)
        copy = self._ext.copy_blocks
        return lambda sb, db, stream, done: copy(*args, sb, db, stream, wait_event, done, device)

    def _block_table(self, conn: Conn, plan: Any, src: kernels.Regions, dst: kernels.Regions,
                     pull: bool) -> kernels.BlockTable | None:
        """The device table that copies whole blocks of `plan`'s specs between these regions, built on first
        use per (direction, spec pair) and kept with the connection; None where only segments can do it."""
        tables = conn.extra.setdefault("block_tables", {})
        key = (pull, id(plan.src_spec), id(plan.dst_spec), plan.regions)
        hit = tables.get(key)
        if hit is not None and hit[0] is plan.src_spec and hit[1] is plan.dst_spec:
            return hit[2]
        try:
            ss, ds, pieces = block_geometry(plan.src_spec, plan.dst_spec)
            if plan.regions is not None:
                sel = list(plan.regions)
                if any(not 0 <= r < len(pieces) for r in sel):
                    raise ValueError(f"plan names regions {sel}, but {len(pieces)} are registered")
                ss, ds, pieces = ss[sel], ds[sel], [pieces[r] for r in sel]
                src = kernels.Regions.from_ptrs(src.ptrs[sel], src.sizes[sel], src.device)
                dst = kernels.Regions.from_ptrs(dst.ptrs[sel], dst.sizes[sel], dst.device)
            table = kernels.BlockTable.build(src, dst, ss, ds, pieces)
        except ValueError as e:
            log.debug("cuda_ipc: copying segments, not blocks: %s", e)
            table = None
        if len(tables) >= 512:
            tables.clear()
        tables[key] = (plan.src_spec, plan.dst_spec, table)
        return table

    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        self._check_request(segments, request_id)
        conn = self._live(peer)
        done, nbytes = self._launch(conn, segments, True, request_id)
        return _CudaHandle(conn.peer.name, request_id, nbytes, done, self._ext)

    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        self._check_request(segments, request_id, notify)
        conn = self._live(peer)
        done, nbytes = self._launch(conn, segments, False, request_id)
        if notify is None:
            return _CudaHandle(conn.peer.name, request_id, nbytes, done, self._ext)
        if conn.link is None:  # TLS: the control plane's Python thread waits for the copy, then tells
            def tell(c: Conn) -> None:
                done.synchronize()
                send_frame(c.sock, FrameType.NOTIF, {"msg": notify})
            return self._submit(conn, tell, request_id, nbytes)
        # the link's native thread waits for the copy's event, then sends: the handle ends when both did
        return self._links.send_notif(conn.link, conn.peer.name, notify, self._api, done.cuda_event,
                                      int(self.device.index or 0), request_id=request_id, nbytes=nbytes)

    @property
    def send_notif_blocks(self) -> bool:  # type: ignore[override]
        """Natively a message is only queued; with TLS the control plane's Python thread sends it."""
        return self._tls_client is not None

    def send_notif(self, peer: Peer | str, message: dict[str, Any]) -> None:
        """Marks this side's KV writes so far as ready (the peer's next copy waits for them on the device),
        then queues the message behind earlier ones to that peer and returns."""
        self.mark_ready()
        conn = self._conn(peer)
        if conn.link is None:
            super().send_notif(peer, message)
        else:
            self._links.send_notif(conn.link, conn.peer.name, message)

    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        """Seconds for one contiguous device-to-device copy of `nbytes` (cudaMemcpy via torch), from the
        peer's mapped memory when one of its allocations is large enough, else within local memory."""
        conn = self._live(peer)
        nbytes = int(nbytes)
        with torch.cuda.device(self.device):
            fresh = self._baseline_buf is None or self._baseline_buf.numel() != nbytes
            if fresh:
                self._baseline_buf = None
                self._baseline_buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dst = self._baseline_buf
            src = None
            bases = conn.extra.get("peer_alloc_bases")
            if bases:
                sizes = [int(a["size"]) for a in conn.peer.info["allocs"]]
                big = [b for b, s in zip(bases, sizes) if s >= nbytes]
                if big:
                    src = kernels.Regions.from_ptrs([big[0]], [nbytes], self.device).tensors[0]
            if src is None:
                src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            stream = torch.cuda.current_stream(self.device)
            if fresh:  # first touch of a new buffer stays out of the timing
                dst.copy_(src)
            stream.synchronize()
            times = []
            for _ in range(max(1, iters)):
                t0 = time.perf_counter()
                dst.copy_(src)
                stream.synchronize()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    # ------------------------------------------------------------------ callbacks and teardown
    def close(self) -> None:
        if self._closed.is_set():
            return
        if self.tensors:
            try:
                torch.cuda.current_stream(self.device).synchronize()
            except RuntimeError as e:
                log.warning("cuda_ipc: synchronizing before close failed: %s", e)
        super().close()
