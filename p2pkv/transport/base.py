"""The transport ABC: register KV memory once, connect to peers, then move lists
of byte segments between registered regions (write: local → peer, read: peer →
local) asynchronously. Transports know nothing of layers, heads or requests
beyond the id they carry for error messages."""
from __future__ import annotations

import numbers
import sys
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from p2pkv.layout import KVCacheSpec
from p2pkv.segments import Segments

__all__ = ["Transport", "TransferHandle", "wait_seconds", "Peer", "Notif", "TransferError", "PeerClosedError", "TransferTimeout",
           "RequestGone", "RequestNotHeldYet", "Connecting", "off_engine_cpus",
           "byte_regions", "advise_hugepages"]


class TransferError(RuntimeError):
    """A transfer failed; says which peer, which request and why."""

    def __init__(self, reason: str, *, peer: str = "?", request_id: str | None = None):
        self.peer, self.request_id, self.reason = peer, request_id, reason
        req = f" request {request_id!r}" if request_id is not None else ""
        super().__init__(f"transfer{req} with peer {peer} failed: {reason}")


class PeerClosedError(TransferError):
    """The peer closed, reset or died; every pending transfer to it fails with this."""


class TransferTimeout(TransferError, TimeoutError):
    """The peer did not answer within the configured timeout."""


class RequestGone(TransferError):
    """A held read (`read_held`) named a request the peer no longer holds: nothing was read."""


class RequestNotHeldYet(TransferError):
    """A held read named a request the peer has not held yet (its engine hands out a request's
    transfer parameters before the step that publishes the hold): nothing was read; ask again."""


def wait_seconds(timeout: Any) -> float | None:
    """A handle's wait() timeout checked: seconds as a float, or None to wait for good (None or beyond
    what a thread can wait); TypeError/ValueError for anything else."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"wait() timeout must be a number of seconds or None, got {type(timeout).__name__}")
    if not timeout >= 0:
        raise ValueError(f"wait() timeout must be >= 0 seconds (or None to wait for good), got {timeout}")
    return None if timeout > threading.TIMEOUT_MAX else float(timeout)


class TransferHandle:
    """An asynchronous transfer: `wait(timeout)` returns or raises a TransferError; `done()` polls.
    There are no completion callbacks: an engine polls from its own thread, so no Python code has
    to run elsewhere for a transfer to complete."""

    def __init__(self, peer: str, request_id: str | None, nbytes: int):
        self._set_fields(peer, request_id, nbytes)
        self._event = threading.Event()
        self._lock = threading.Lock()

    def _set_fields(self, peer: str, request_id: str | None, nbytes: int) -> None:
        """Everything but the threading objects, for handles that make those only when needed."""
        self.peer, self.request_id, self.nbytes = peer, request_id, nbytes
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Block until the transfer ends (at most `timeout` seconds; 0 polls, None or inf waits for good)."""
        if not self._event.wait(wait_seconds(timeout)):
            raise TransferTimeout(f"not finished after {timeout:.3g} s", peer=self.peer, request_id=self.request_id)
        if self._error is not None:
            raise self._error

    def _finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            if error is not None and not isinstance(error, TransferError):
                error = TransferError(f"{type(error).__name__}: {error}", peer=self.peer, request_id=self.request_id)
            self._error = error
            self._event.set()


@dataclass
class Peer:
    """A connected peer: its name, the address we dialled, and its KV spec."""

    name: str
    address: str
    spec: KVCacheSpec | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Notif:
    """A small message from a peer (msgpack-able dict), e.g. 'done with request R'."""

    peer: str
    message: dict[str, Any]


def _checked_tensors(tensors: Any, spec: Any) -> list[torch.Tensor]:
    """The KV tensors as a list, or a TypeError/ValueError naming the first way they differ from what
    `spec` describes (a spec of other tensors would let transfers address memory outside these)."""
    if spec is None:
        raise ValueError("register() needs the KVCacheSpec of the tensors (KVCacheSpec.from_tensors(...))")
    if not isinstance(spec, KVCacheSpec):
        raise TypeError(f"register() spec must be a KVCacheSpec (KVCacheSpec.from_tensors(...)), "
                        f"got {type(spec).__name__}")
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"KV tensor {i} is a {type(t).__name__}, not a torch.Tensor")
    if len(tensors) != len(spec.regions):
        raise ValueError(f"{len(tensors)} tensors given for a spec of {len(spec.regions)} regions")
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(f"KV tensors live on several devices {devices}; register the tensors of one device "
                         "per transport")
    for i, (t, r) in enumerate(zip(tensors, spec.regions)):
        where = f"KV tensor {i} (shape {list(t.shape)}, {str(t.dtype).removeprefix('torch.')})"
        if t.is_meta:
            raise ValueError(f"{where} is on the meta device: it has no memory to transfer")
        if str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise ValueError(f"{where} does not match the spec's dtype {spec.dtype!r}; build the spec from "
                             "these tensors")
        esz = t.element_size()
        extent = (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * esz if t.numel() else 0
        blocks_fit = any(n == r.num_blocks and (n == 1 or st * esz == r.block_stride)
                         for n, st in zip(t.shape, t.stride()))
        if extent != r.nbytes or not blocks_fit:
            raise ValueError(f"{where} spans {extent} bytes but the spec describes region {i} as {r.num_blocks} blocks "
                             f"{r.block_stride} bytes apart in {r.nbytes} bytes; build the spec from these tensors, in "
                             "the same order (KVCacheSpec.from_tensors(...))")
    return tensors


def byte_regions(tensors: Sequence[torch.Tensor], spec: KVCacheSpec) -> list[torch.Tensor]:
    """Flat uint8 views of the memory each registered tensor spans (no copy)."""
    out = []
    for t, r in zip(tensors, spec.regions):
        storage = torch.empty(0, dtype=torch.uint8, device=t.device)
        storage.set_(t.untyped_storage())
        start = t.storage_offset() * t.element_size()
        out.append(storage[start:start + r.nbytes])
    return out


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def advise_hugepages(regions: Sequence[torch.Tensor]) -> int:
    """Back registered CPU memory with 2 MiB pages where the kernel allows, as RDMA
    stacks do with the memory they register: a transfer of many small scattered
    spans then walks far fewer page tables. Linux only; contents never change.
    Pages already present are collapsed now (MADV_COLLAPSE, Linux 6.1+, about
    0.3 s per GiB), else only hinted (MADV_HUGEPAGE). Only the 2 MiB-aligned
    interior of each contiguous run of regions is touched. Returns the bytes advised."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    runs: list[list[int]] = []
    for start, end in sorted((r.data_ptr(), r.data_ptr() + r.numel() * r.element_size())
                             for r in regions if r.device.type == "cpu" and r.numel()):
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    advised = 0
    for start, end in runs:
        lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if hi > lo and (madvise(lo, hi - lo, _MADV_COLLAPSE) == 0 or madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0):
            advised += hi - lo
    return advised


def off_engine_cpus() -> None:
    """Called first by each thread p2pkv starts: it must not inherit the core an engine pinned its
    compute thread to (vLLM on CPU does, and its OpenMP threads spin there), or it waits behind them
    for the CPU for seconds (csrc/net/threads.h; P2PKV_IO_CPUS chooses the CPUs)."""
    try:
        from p2pkv._native import use_io_cpus
    except ImportError:
        return
    use_io_cpus()


class Connecting:
    """A connection under way (`Transport.connect_async`): poll `done()` from the caller's thread,
    then `result()` gives the Peer or raises what `connect` would have raised. This default dials
    with the blocking `connect` on a short-lived thread of its own; transports that hand-shake
    natively need no Python thread for it."""

    def __init__(self, connect: Callable[[], Peer], name: str):
        self._outcome: Any = None
        self._ended = threading.Event()

        def run() -> None:
            off_engine_cpus()
            try:
                self._outcome = connect()
            except BaseException as e:  # noqa: BLE001 - handed to result()
                self._outcome = e
            self._ended.set()
        threading.Thread(target=run, name=name, daemon=True).start()

    def done(self) -> bool:
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def result(self) -> Peer:
        """The connected Peer; raises the dial's error. Only once done()."""
        if not self._ended.is_set():
            raise RuntimeError("result() of a connection still under way: poll done() first")
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def cancel(self) -> None:
        """Stop waiting for it (a dial under way ends within the timeout)."""


class Transport(ABC):
    """Moves byte segments between registered KV regions of two processes.

    Lifecycle: `register(tensors, spec)` once, `connect(address)` per peer (the
    handshake checks versions, KV specs and the auth token), then any number of
    `write`/`read` calls, each returning a `TransferHandle`. `close()` frees all.
    """

    name: ClassVar[str] = "?"
    # Whether send_notif() may wait for the peer (up to the timeout); False: it only queues the message
    # behind earlier transfers to that peer and returns, so an engine's thread may call it directly.
    send_notif_blocks: bool = True
    # Whether this side serves `read_held` requests (hold/unhold/serving): a read that moves bytes only
    # while the serving side still holds the request, checked where the read is served.
    holds_reads: bool = False

    def __init__(self, *, timeout: float = 30.0, auth_token: str | bytes | None = None, name: str | None = None):
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__} {timeout!r}")
        if not 0 < timeout <= threading.TIMEOUT_MAX:
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout}")
        if auth_token is not None and not isinstance(auth_token, (str, bytes)):
            raise TypeError(f"auth_token must be a str or bytes shared secret (or None), "
                            f"got {type(auth_token).__name__}")
        if auth_token is not None and not auth_token:
            raise ValueError("auth_token is empty: pass the same non-empty secret on both sides, or None for no token")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self.timeout = float(timeout)
        self.auth_token = auth_token.encode() if isinstance(auth_token, str) else auth_token
        self.local_name = name or f"{self.name}-{id(self):x}"
        self.spec: KVCacheSpec | None = None
        self.tensors: list[torch.Tensor] = []
        self.regions: list[torch.Tensor] = []

    def register(self, tensors: Sequence[torch.Tensor], spec: KVCacheSpec | None = None) -> KVCacheSpec:
        """Register the KV tensors (as the engine holds them) that transfers read and write; once per transport."""
        if self.spec is not None:
            raise RuntimeError(f"{self.name} transport: KV memory is already registered; register() may be called "
                               "once (make a new transport for other tensors)")
        tensors = _checked_tensors(tensors, spec)
        self.tensors, self.spec = tensors, spec
        self.regions = byte_regions(tensors, spec)
        return spec

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device if self.tensors else torch.device("cpu")

    def _require_registered(self) -> KVCacheSpec:
        if self.spec is None:
            raise RuntimeError(f"{self.name} transport: register() the KV tensors before connecting or transferring")
        return self.spec

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers connect to this transport."""

    @abstractmethod
    def connect(self, address: str) -> Peer:
        """Connect (or return the live connection) to the peer listening at `address`."""

    def connect_async(self, address: str) -> Connecting:
        """Start `connect(address)` without waiting: poll the returned `done()`, then take `result()`."""
        self._require_registered()
        return Connecting(lambda: self.connect(address), f"p2pkv-{self.name}-dial")

    def reply_address(self, peer: str) -> str | None:
        """The address that reaches the peer whose messages arrive under `peer` (a Notif's `peer`), as its
        connection established it (for an accepted peer: the listen port its handshake announced, at the
        host the connection came from), never an address a message carried; None if not known."""
        return None

    @abstractmethod
    def write(self, peer: Peer | str, segments: Segments, request_id: str | None = None,
              notify: dict[str, Any] | None = None) -> TransferHandle:
        """Copy local `segments.src` into the peer's `segments.dst`; with `notify`, the
        peer gets that message as a Notif once the bytes have landed."""

    @abstractmethod
    def read(self, peer: Peer | str, segments: Segments, request_id: str | None = None) -> TransferHandle:
        """Copy the peer's `segments.src` into local `segments.dst`."""

    def read_held(self, peer: Peer | str, segments: Segments, request_id: str) -> TransferHandle:
        """As `read`, served only while the peer holds `request_id` (its `hold`), else the handle fails
        with RequestGone and nothing moves: one round trip means "still held, and sent"."""
        raise NotImplementedError(f"{self.name} does not serve held reads (holds_reads is False)")

    def hold(self, request_id: str) -> None:
        """Serve held reads of `request_id` from now on (its blocks stay where they are)."""
        raise NotImplementedError(f"{self.name} does not serve held reads (holds_reads is False)")

    def unhold(self, request_id: str) -> bool:
        """Serve no new held read of `request_id`; False while one is still being served (poll `serving`)."""
        raise NotImplementedError(f"{self.name} does not serve held reads (holds_reads is False)")

    def serving(self, request_id: str) -> bool:
        """Whether a held read of `request_id` is being served now."""
        raise NotImplementedError(f"{self.name} does not serve held reads (holds_reads is False)")

    @abstractmethod
    def send_notif(self, peer: Peer | str, message: dict[str, Any]) -> None:
        """Send a small msgpack-able message to the peer (ordered after earlier writes)."""

    @abstractmethod
    def get_notifs(self) -> list[Notif]:
        """Messages received since the last call."""

    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        """Seconds per move of `nbytes` as one contiguous buffer over this link's cheapest raw path."""
        raise NotImplementedError(f"{self.name} has no raw baseline")

    @abstractmethod
    def close(self) -> None:
        """Fail pending transfers, close connections and free registrations."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
