"""The Python face of the native data path (csrc/net, built as p2pkv._native): the binary request
frames it parses, the block geometry it builds iovecs from, and handles that complete by polling
an atomic (or waiting without the GIL). After the per-peer handshake, no Python runs on a
transfer's path but the caller's own post and poll."""
from __future__ import annotations

import itertools
import logging
import socket
import struct
from typing import Any, Sequence

import msgpack
import numpy as np

from p2pkv.layout import BlockRows
from p2pkv.transport.base import (Notif, PeerClosedError, RequestGone, RequestNotHeldYet, TransferError,
                                  TransferHandle, TransferTimeout, wait_seconds)
from p2pkv.wire import check_message

log = logging.getLogger("p2pkv.transport")

__all__ = ["native", "require", "NativeLinks", "decode_message", "drain_messages", "BUILD_HINT", "NativeHandle", "geometry", "request_body", "frame", "OP_READ",
           "OP_WRITE", "OP_SEND", "OP_BASELINE", "DATA_READ", "DATA_WRITE", "NOTIF", "BASELINE", "GEOMETRY", "VERSION",
           "geometry_body",
           "FORM_BLOCKS", "FORM_TABLE"]

BUILD_HINT = ("build it with `pip install -e .` (or `pip install .`) from a p2pkv checkout on a machine with a "
              "C++17 compiler (g++ or clang++)")

try:
    from p2pkv import _native as native
    _why: str | None = None
except ImportError as e:  # the extension is optional at install time; the backends that need it say so
    native = None  # type: ignore[assignment]
    _why = str(e)

OP_READ, OP_WRITE, OP_SEND, OP_BASELINE = 0, 1, 2, 3
NOTIF, CLOSE, DATA_READ, DATA_WRITE, BASELINE, GEOMETRY = 8, 10, 11, 12, 13, 15
FORM_BLOCKS, FORM_TABLE = 0, 1
VERSION = 4
ALL_REGIONS = 0xFFFFFFFF
_HEADER = struct.Struct("<4sHHIQ")
_HEAD = struct.Struct("<BBHIIIQ")
_KINDS = {1: TransferTimeout, 2: PeerClosedError, 3: TransferError, 4: TransferError, 5: PeerClosedError, 6: RequestGone,
          7: RequestNotHeldYet}
FLAG_HELD = 1


def require(backend: str) -> Any:
    """The extension module, or BackendUnavailable saying how to build it (never a silent fallback)."""
    if native is None:
        from p2pkv.transport import BackendUnavailable
        raise BackendUnavailable(f"the {backend} backend needs p2pkv's native data path (p2pkv._native), which is "
                                 f"not built here ({_why}); {BUILD_HINT}")
    return native


def frame(ftype: int, body: bytes = b"", payload_len: int = 0) -> bytes:
    return _HEADER.pack(b"P2KV", VERSION, ftype, len(body), payload_len) + body


def request_body(form: int, request_id: str | None, items: bytes, count: int,
                 regions: Sequence[int] | None = None, notify: bytes = b"", flags: int = 0) -> bytes:
    """A data request's body as csrc/net/frame.cpp parses it: fixed head, request id, notify
    message, region indices, then int64 block ids or (region, offset, length) rows."""
    rid = (request_id or "").encode()
    regs = b"" if regions is None else np.asarray(regions, dtype="<u4").tobytes()
    n_regions = ALL_REGIONS if regions is None else len(regions)
    return _HEAD.pack(form, flags, len(rid), len(notify), n_regions, 0, count) + rid + notify + regs + items


def geometry(rows: BlockRows, side: str, bases: Sequence[int], sizes: Sequence[int]) -> Any:
    """The native geometry of one side ('src' or 'dst') of a spec pair: where its regions are, its
    block stride per region and the pieces of a block that move, in BlockRows' canonical order."""
    strides, starts, offs, lens, n = _columns(rows, side)
    return require("tcp").Geometry(np.asarray(bases, dtype="<u8").tobytes(), np.asarray(sizes, dtype="<u8").tobytes(),
                                   strides.tobytes(), n, starts.tobytes(), offs.tobytes(), lens.tobytes())


def _columns(rows: BlockRows, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One side's (strides, piece starts, offsets, lengths, block count) of a spec pair."""
    col = 0 if side == "src" else 1
    pieces = rows._pieces
    starts = np.zeros(len(pieces) + 1, dtype="<u4")
    starts[1:] = np.cumsum([len(p) for p in pieces])
    offs = np.concatenate([p[:, col] for p in pieces]).astype("<u8") if pieces else np.zeros(0, "<u8")
    lens = np.concatenate([p[:, 2] for p in pieces]).astype("<u8") if pieces else np.zeros(0, "<u8")
    return np.asarray(rows._stride[col], dtype="<u8"), starts, offs, lens, int(rows.num_blocks[col])


def geometry_body(rows: BlockRows, side: str, write: bool) -> bytes:
    """A GEOMETRY frame's body (csrc/net/geometry.h): the serving peer's rows (`side` of `rows`) for
    one direction, which the dialling side computes from both specs, so the peer serves with no
    per-peer set-up in Python; the peer checks every piece against its own regions."""
    strides, starts, offs, lens, n = _columns(rows, side)
    return (struct.pack("<B3xIQ", 1 if write else 0, len(strides), n) + strides.tobytes() + starts.tobytes()
            + offs.tobytes() + lens.tobytes())


def remote_message(meta: bytes) -> str:
    """What a peer's ERROR body says (msgpack {kind, message}); decoded only on the error path."""
    import msgpack
    try:
        m = msgpack.unpackb(meta, raw=False, unicode_errors="replace")
        return str(m.get("message", m)) if isinstance(m, dict) else str(m)
    except Exception:  # noqa: BLE001 - a garbled error body still fails the transfer
        return f"the peer refused the request ({len(meta)}-byte error body not decodable)"


class NativeHandle(TransferHandle):
    """A transfer progressed by a native thread: `done()` reads an atomic, `wait()` blocks without
    the GIL; no Python callback runs for it to complete."""

    def __init__(self, op: Any, peer: str, request_id: str | None, nbytes: int):
        self._set_fields(peer, request_id, nbytes)
        self._op = op
        self._converted = False

    def done(self) -> bool:
        return self._op.done()

    @property
    def error(self) -> BaseException | None:
        if not self._converted and self._op.done():
            err = self._op.error()
            if err is not None:
                kind, message, meta = err
                if kind == 3 and meta:
                    message = remote_message(meta)
                self._error = _KINDS.get(kind, TransferError)(message, peer=self.peer, request_id=self.request_id)
            self._converted = True
        return self._error

    def seconds(self) -> float:
        """Native time from the request's first byte sent to its last byte moved."""
        return self._op.seconds()

    def wait(self, timeout: float | None = None) -> None:
        t = wait_seconds(timeout)
        if not self._op.wait(-1.0 if t is None else t):
            raise TransferTimeout(f"not finished after {timeout:.3g} s", peer=self.peer, request_id=self.request_id)
        if self.error is not None:
            raise self.error

    def _finish(self, error: BaseException | None = None) -> None:
        raise NotImplementedError("a native transfer is finished by its native thread")


class NativeLinks:
    """A transport's native connections: takes over a socket whose handshake passed (dialled: an
    Initiator that runs posted ops in order; accepted: a Server that serves requests), collects what
    peers send into one bounded inbox, and decodes it for `get_notifs()` in the caller's thread."""

    def __init__(self, backend: str, timeout: float):
        self.mod = require(backend)
        self.backend, self.timeout = backend, timeout
        self.inbox = self.mod.Inbox()
        self.held = self.mod.Held()
        self._names: dict[int, str] = {}
        self._ids = itertools.count(1)
        self.adopt: Any = None  # called when a message comes from a peer not yet named (natively served)

    def name(self, pid: int, peer: str) -> None:
        """Name a peer the native acceptor serves under `pid`, for the messages it sends."""
        self._names[pid] = peer

    def initiator(self, sock: socket.socket, cuda_api: int = 0, device: int = -1, staging_bytes: int = 0) -> Any:
        return self.mod.Initiator(sock.detach(), self.timeout, cuda_api, device, staging_bytes)

    def server(self, sock: socket.socket, peer: str, bases: Sequence[int] = (), sizes: Sequence[int] = (),
               read_geo: Any = None, write_geo: Any = None, cuda_api: int = 0, device: int = -1,
               staging_bytes: int = 0) -> Any:
        """Serve one accepted connection: requests by block ids against the geometries, segment tables
        against the regions at `bases` (none: the peer may only send notifications)."""
        pid = next(self._ids)
        self._names[pid] = peer
        return self.mod.Server(sock.detach(), self.timeout, pid, np.asarray(bases, "<u8").tobytes(),
                               np.asarray(sizes, "<u8").tobytes(), read_geo, write_geo, self.inbox, cuda_api, device,
                               staging_bytes, self.held)

    def send_notif(self, link: Any, peer: str, message: dict[str, Any], cuda_api: int = 0, cuda_event: int = 0,
                   device: int = -1, request_id: str | None = None, nbytes: int = 0) -> "NativeHandle":
        """Queue a message behind the link's earlier ops (after `cuda_event` completes, if given); raises
        at once only if the link is already down."""
        check_message(message, "notification")
        body = msgpack.packb(dict(message), use_bin_type=True)
        if len(body) > self.mod.MAX_NOTIFY:
            raise ValueError(f"notification of {len(body)} bytes exceeds the limit of {self.mod.MAX_NOTIFY}")
        op = link.post(OP_SEND, frame(NOTIF, body), None, None, 0, 0, 0, cuda_api, cuda_event, device)
        h = NativeHandle(op, peer, request_id, nbytes)
        if op.done() and op.error() is not None:
            h.wait(0)
        return h

    def notifs(self) -> list[Notif]:
        items = self.inbox.drain()
        if self.adopt is not None and any(pid not in self._names for pid, _ in items):
            self.adopt()  # a natively served peer is in the acceptor's queue before its first message
        return decode_messages(items, self._names, self.backend)


def decode_message(body: bytes, peer: str, backend: str) -> Notif | None:
    """A peer's msgpack message as a Notif; None (logged) when it is malformed or not a map, so a bad
    message is dropped instead of raised into the engine's call."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for malformed input
        log.warning("%s: dropped a malformed message from %s: %s", backend, peer, e)
        return None
    if not isinstance(msg, dict):
        log.warning("%s: dropped a message from %s that is not a map", backend, peer)
        return None
    return Notif(peer, msg)


def drain_messages(inbox: Any, names: dict[int, str], backend: str) -> list[Notif]:
    """Everything a native inbox holds, decoded, each named by the peer its link was made for."""
    return decode_messages(inbox.drain(), names, backend)


def decode_messages(items: list[tuple[int, bytes]], names: dict[int, str], backend: str) -> list[Notif]:
    out = []
    for pid, body in items:
        n = decode_message(body, names.get(pid, "?"), backend)
        if n is not None:
            out.append(n)
    return out
