"""Control-plane frames and the connection handshake.

A frame is a fixed little-endian header (magic, version, type, metadata length,
payload length) followed by msgpack metadata; limits are checked before anything
is allocated, and nothing is ever unpickled. The handshake checks the protocol
version, the two KV specs and, with a shared token, a mutual HMAC challenge.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Mapping

import msgpack

__all__ = ["MAGIC", "VERSION", "HEADER", "FrameType", "Frame", "ProtocolError", "HandshakeError", "AuthError",
           "encode_frame", "decode_header", "decode_meta", "send_frame", "recv_frame", "recv_exact", "recv_into_exact",
           "client_handshake", "server_handshake", "encode_hello", "parse_hello", "recv_handshake", "pack_info",
           "unpack_info", "remote_error", "MAX_META", "MAX_PAYLOAD", "MAX_REQUEST_ID", "check_request_id",
           "check_message"]

MAGIC = b"P2KV"
VERSION = 4  # 2: binary request frames (csrc/net/frame.h); 3: binary HELLO/AUTH bodies (csrc/net/hello.h); 4: GEOMETRY frames
HEADER = struct.Struct("<4sHHIQ")
MAX_META = 32 << 20
MAX_PAYLOAD = 1 << 40
MAX_REQUEST_ID = 1 << 10  # UTF-8 bytes; ids travel in every request frame and in every error message
NONCE_BYTES = 32
MAC_BYTES = 32
HELLO_FIXED = 1 + NONCE_BYTES + MAC_BYTES  # flags, nonce, MAC; then the msgpack info
MAX_HELLO_INFO = 1 << 20


class FrameType(IntEnum):
    HELLO = 1
    AUTH = 2
    READY = 3
    ERROR = 4
    WRITE = 5
    READ = 6
    ACK = 7
    NOTIF = 8
    BASELINE = 9
    CLOSE = 10


class ProtocolError(ConnectionError):
    """A peer sent something that is not a valid p2pkv frame; the connection is closed."""


class HandshakeError(ProtocolError):
    """The two sides cannot talk: protocol version or KV layout differ (the message names the field)."""


class AuthError(HandshakeError):
    """The peer could not prove it holds the shared auth token (or we could not)."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    meta: dict[str, Any]
    payload_len: int


def encode_frame(ftype: FrameType, meta: Mapping[str, Any] | None = None, payload_len: int = 0) -> bytes:
    body = msgpack.packb(dict(meta or {}), use_bin_type=True)
    if len(body) > MAX_META:
        raise ProtocolError(f"metadata of {len(body)} bytes exceeds the frame limit of {MAX_META}")
    return HEADER.pack(MAGIC, VERSION, int(ftype), len(body), payload_len) + body


def check_request_id(request_id: Any) -> None:
    """TypeError/ValueError unless `request_id` is None or a str of at most MAX_REQUEST_ID UTF-8 bytes."""
    if request_id is None:
        return
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__} {request_id!r:.80}")
    try:
        n = len(request_id.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"request_id {request_id[:40]!r} is not valid text: {e.reason}") from None
    if n > MAX_REQUEST_ID:
        raise ValueError(f"request_id {request_id[:40]!r}... is {n} bytes long; the limit is {MAX_REQUEST_ID}")


def check_message(message: Any, what: str = "message") -> None:
    """TypeError unless `message` is a dict the peer can decode: msgpack types only (None, bool, int, float,
    str, bytes, list, tuple, dict) with str keys at every level."""
    if not isinstance(message, Mapping):
        raise TypeError(f"{what} must be a dict of msgpack-able values, got {type(message).__name__}")
    try:
        msgpack.unpackb(msgpack.packb(dict(message), use_bin_type=True), raw=False, strict_map_key=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{what} cannot be sent: {e}; use str keys and msgpack types (None, bool, int, float, "
                        "str, bytes, list, dict)") from None


def decode_header(raw: bytes, max_meta: int = MAX_META, max_payload: int = MAX_PAYLOAD) -> tuple[FrameType, int, int]:
    """Validate a header; returns (type, meta length, payload length)."""
    if len(raw) != HEADER.size:
        raise ProtocolError(f"truncated frame header: {len(raw)} of {HEADER.size} bytes")
    magic, version, ftype, mlen, plen = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: the peer does not speak p2pkv (expected {MAGIC!r})")
    if version != VERSION:
        raise HandshakeError(f"protocol version mismatch: peer speaks {version}, this side {VERSION}; "
                             "upgrade both sides to the same p2pkv release")
    try:
        ft = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    if mlen > max_meta:
        raise ProtocolError(f"metadata length {mlen} exceeds the limit of {max_meta}")
    if plen > max_payload:
        raise ProtocolError(f"payload length {plen} exceeds the limit of {max_payload}")
    return ft, mlen, plen


def decode_meta(body: bytes) -> dict[str, Any]:
    try:
        meta = msgpack.unpackb(body, raw=False, strict_map_key=True,
                               use_list=True)
    except Exception as e:  # msgpack raises several types for malformed input
        raise ProtocolError(f"malformed frame metadata: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"frame metadata must be a map, got {type(meta).__name__}")
    return meta


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; ConnectionResetError if the peer closes first."""
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionResetError(f"peer closed the connection after {got} of {n} bytes")
        got += k


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def send_frame(sock: socket.socket, ftype: FrameType, meta: Mapping[str, Any] | None = None, payload_len: int = 0) -> None:
    sock.sendall(encode_frame(ftype, meta, payload_len))


def recv_frame(sock: socket.socket, max_meta: int = MAX_META, max_payload: int = MAX_PAYLOAD) -> Frame:
    ft, mlen, plen = decode_header(recv_exact(sock, HEADER.size), max_meta, max_payload)
    meta = decode_meta(recv_exact(sock, mlen)) if mlen else {}
    if ft == FrameType.ERROR:
        raise remote_error(meta)
    return Frame(ft, meta, plen)


def remote_error(meta: Mapping[str, Any]) -> ProtocolError:
    kind, msg = str(meta.get("kind", "")), str(meta.get("message", "peer reported an error"))[:2000]
    cls = {"auth": AuthError, "handshake": HandshakeError}.get(kind, ProtocolError)
    return cls(f"peer refused: {msg}")


def _mac(token: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, label + a + b, hashlib.sha256).digest()


def pack_info(info: Mapping[str, Any]) -> bytes:
    """What a side says about itself in its HELLO (msgpack), checked against the size limit."""
    raw = msgpack.packb(dict(info), use_bin_type=True)
    if len(raw) > MAX_HELLO_INFO:
        raise ProtocolError(f"handshake info of {len(raw)} bytes exceeds the limit of {MAX_HELLO_INFO}")
    return raw


def unpack_info(raw: bytes) -> dict[str, Any]:
    """A peer's HELLO info: a msgpack map, or ProtocolError."""
    info = decode_meta(raw)
    if not isinstance(info.get("spec", {}), dict):
        raise ProtocolError("handshake info carries no spec map")
    return info


def encode_hello(info: bytes, nonce: bytes, auth: bool, mac: bytes = bytes(MAC_BYTES)) -> bytes:
    """A HELLO frame: flags, nonce, MAC, then the msgpack info (csrc/net/hello.h reads the same)."""
    body = bytes([1 if auth else 0]) + nonce + mac + info
    return HEADER.pack(MAGIC, VERSION, FrameType.HELLO, len(body), 0) + body


def parse_hello(body: bytes) -> tuple[bool, bytes, bytes, bytes]:
    """(auth, nonce, mac, info) of a HELLO body, or ProtocolError."""
    if not HELLO_FIXED <= len(body) <= HELLO_FIXED + MAX_HELLO_INFO or body[0] > 1:
        raise ProtocolError(f"malformed HELLO ({len(body)} bytes, flags {body[:1].hex() or 'none'})")
    return body[0] == 1, body[1:1 + NONCE_BYTES], body[1 + NONCE_BYTES:HELLO_FIXED], body[HELLO_FIXED:]


_HANDSHAKE_LIMITS = {FrameType.HELLO: (HELLO_FIXED, HELLO_FIXED + MAX_HELLO_INFO), FrameType.AUTH: (MAC_BYTES, MAC_BYTES),
                     FrameType.READY: (0, 0), FrameType.ERROR: (0, 64 << 10)}


def recv_handshake(sock: socket.socket, expect: FrameType) -> bytes:
    """The body of the next handshake frame, which must be `expect`; a peer's ERROR is raised as
    the error it names, anything else as ProtocolError (limits as in csrc/net/hello.cpp)."""
    ft, mlen, plen = decode_header(recv_exact(sock, HEADER.size), max_meta=HELLO_FIXED + MAX_HELLO_INFO)
    lo, hi = _HANDSHAKE_LIMITS.get(ft, (1, 0))
    if not lo <= mlen <= hi or plen:
        raise ProtocolError(f"unexpected {ft.name} frame of {mlen} bytes during the handshake")
    body = recv_exact(sock, mlen)
    if ft == FrameType.ERROR:
        raise remote_error(decode_meta(body))
    if ft != expect:
        raise ProtocolError(f"expected a {expect.name} frame during the handshake, got {ft.name}")
    return body


def _refuse(sock: socket.socket, kind: str, message: str) -> None:
    try:
        send_frame(sock, FrameType.ERROR, {"kind": kind, "message": message})
    except OSError:
        pass


def client_handshake(sock: socket.socket, info: Mapping[str, Any], token: bytes | None,
                     check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Open a connection: HELLO both ways, mutual HMAC when a token is set, then READY.
    `check(peer_info)` raises ValueError on an incompatible peer. Returns the peer's info.
    (The native Dialer, csrc/net/dial.cpp, speaks the same; this one serves TLS.)"""
    nonce_c = os.urandom(NONCE_BYTES)
    sock.sendall(encode_hello(pack_info(info), nonce_c, token is not None))
    auth, nonce_s, mac, raw = parse_hello(recv_handshake(sock, FrameType.HELLO))
    if auth != (token is not None):
        msg = ("the peer requires an auth token and none is configured here" if auth
               else "an auth token is configured here but the peer has none")
        _refuse(sock, "auth", msg)
        raise AuthError(msg + " (set the same auth token, e.g. P2PKV_AUTH_TOKEN, on both sides)")
    if token is not None:
        if not hmac.compare_digest(mac, _mac(token, b"server", nonce_c, nonce_s)):
            _refuse(sock, "auth", "auth token mismatch")
            raise AuthError("the peer failed the auth challenge: its auth token differs from ours")
        sock.sendall(HEADER.pack(MAGIC, VERSION, FrameType.AUTH, MAC_BYTES, 0) + _mac(token, b"client", nonce_s, nonce_c))
    peer = unpack_info(raw)
    recv_handshake(sock, FrameType.READY)
    try:
        check(peer)
    except ValueError as e:
        _refuse(sock, "handshake", str(e))
        raise HandshakeError(str(e)) from None
    return peer


def server_handshake(sock: socket.socket, info: Mapping[str, Any], token: bytes | None,
                     check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Accept a connection: the mirror of `client_handshake` (and of csrc/net/accept.cpp); nothing
    else is read from the peer until it has proven the token."""
    auth, nonce_c, _, raw = parse_hello(recv_handshake(sock, FrameType.HELLO))
    nonce_s = os.urandom(NONCE_BYTES)
    mac = _mac(token, b"server", nonce_c, nonce_s) if token is not None and auth else bytes(MAC_BYTES)
    sock.sendall(encode_hello(pack_info(info), nonce_s, token is not None, mac))
    if auth != (token is not None):
        _refuse(sock, "auth", "auth token configured on one side only")
        raise AuthError("auth token configured on one side only")
    if token is not None:
        theirs = recv_handshake(sock, FrameType.AUTH)
        if not hmac.compare_digest(theirs, _mac(token, b"client", nonce_s, nonce_c)):
            _refuse(sock, "auth", "auth token mismatch")
            raise AuthError("a peer failed the auth challenge (wrong auth token); refused before any KV byte moved")
    peer = unpack_info(raw)
    try:
        check(peer)
    except ValueError as e:
        _refuse(sock, "handshake", str(e))
        raise HandshakeError(str(e)) from None
    sock.sendall(HEADER.pack(MAGIC, VERSION, FrameType.READY, 0, 0))
    return peer
