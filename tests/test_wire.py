"""Wire frames and the handshake: round trips, and every malformed input refused with a clear error."""
from __future__ import annotations

import os
import socket
import struct
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pkv.wire import (HEADER, MAGIC, MAX_META, MAX_REQUEST_ID, VERSION, AuthError, FrameType, HandshakeError,
                        ProtocolError, check_message, check_request_id, client_handshake, decode_header, decode_meta,
                        encode_frame, recv_frame, server_handshake)


def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_round_trip():
    a, b = pair()
    meta = {"req": "r1", "segs": b"\x00" * 48, "n": [1, 2, 3]}
    a.sendall(encode_frame(FrameType.WRITE, meta, payload_len=123))
    f = recv_frame(b)
    assert f.type == FrameType.WRITE and f.meta == meta and f.payload_len == 123


@pytest.mark.parametrize("raw, cls, msg", [
    (b"P2KV\x01\x00", ProtocolError, "truncated"),
    (HEADER.pack(b"HTTP", VERSION, 1, 0, 0), ProtocolError, "bad magic"),
    (HEADER.pack(MAGIC, VERSION + 1, 1, 0, 0), HandshakeError, "protocol version mismatch"),
    (HEADER.pack(MAGIC, VERSION, 99, 0, 0), ProtocolError, "unknown frame type"),
    (HEADER.pack(MAGIC, VERSION, 1, MAX_META + 1, 0), ProtocolError, "exceeds the limit"),
    (HEADER.pack(MAGIC, VERSION, 1, 0, 1 << 50), ProtocolError, "payload length"),
])
def test_bad_headers_are_refused(raw, cls, msg):
    with pytest.raises(cls, match=msg):
        decode_header(raw)


@pytest.mark.parametrize("body, msg", [(b"\xc1", "malformed"), (msgpack.packb([1, 2]), "must be a map"),
                                       (msgpack.packb({"a": 1})[:-1], "malformed")])
def test_bad_metadata_is_refused(body, msg):
    with pytest.raises(ProtocolError, match=msg):
        decode_meta(body)


def test_truncated_frame_on_a_socket_is_a_connection_error():
    a, b = pair()
    a.sendall(encode_frame(FrameType.NOTIF, {"msg": {"x": 1}})[:-3])
    a.close()
    with pytest.raises(ConnectionError):
        recv_frame(b)


FUZZ_EXAMPLES = int(os.environ.get("P2PKV_FUZZ_EXAMPLES", "300"))

meta_values = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=40) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decoder_never_crashes(data):
    try:
        ft, mlen, plen = decode_header(data[:HEADER.size].ljust(HEADER.size, b"\0"))
        decode_meta(data[HEADER.size:HEADER.size + mlen])
    except ProtocolError:
        pass


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None)
@given(frames=st.lists(st.tuples(st.sampled_from(list(FrameType)), st.dictionaries(
    st.sampled_from(["info", "nonce", "auth", "mac", "kind", "message", "x"]), meta_values, max_size=5),
    st.integers(0, 1 << 45)), max_size=3), tail=st.binary(max_size=64), token=st.sampled_from([None, b"k"]))
def test_fuzz_server_handshake_only_raises_protocol_errors(frames, tail, token):
    a, b = pair()
    b.settimeout(0.2)
    try:
        a.sendall(b"".join(encode_frame(t, m, n) for t, m, n in frames) + tail)
        a.shutdown(socket.SHUT_WR)
        try:
            server_handshake(b, {"name": "P"}, token, lambda info: None)
        except (ProtocolError, OSError):
            pass
    finally:
        a.close()
        b.close()


def run_handshake(token_c, token_s, info_c=None, info_s=None, check_c=None, check_s=None):
    a, b = pair()
    res = {}

    def server():
        try:
            res["server"] = server_handshake(b, info_s or {"name": "P"}, token_s, check_s or (lambda i: None))
        except Exception as e:  # noqa: BLE001
            res["server"] = e
    t = threading.Thread(target=server)
    t.start()
    try:
        res["client"] = client_handshake(a, info_c or {"name": "D"}, token_c, check_c or (lambda i: None))
    except Exception as e:  # noqa: BLE001
        res["client"] = e
    t.join(10)
    a.close()
    b.close()
    return res["client"], res["server"]


def test_handshake_without_token():
    c, s = run_handshake(None, None)
    assert c == {"name": "P"} and s == {"name": "D"}


def test_handshake_with_matching_token():
    c, s = run_handshake(b"tok", b"tok")
    assert c["name"] == "P" and s["name"] == "D"


@pytest.mark.parametrize("tc, ts", [(b"Zq9-secret", b"other"), (None, b"Zq9-secret"), (b"Zq9-secret", None)])
def test_handshake_refuses_wrong_or_missing_token_on_both_sides(tc, ts):
    c, s = run_handshake(tc, ts)
    assert isinstance(c, AuthError) and isinstance(s, AuthError)
    assert "Zq9-secret" not in str(c) + str(s)


def test_handshake_check_failure_names_the_field_on_both_sides():
    def check(info):
        raise ValueError("KV cache mismatch in block_size: local 16 vs peer 32")
    c, s = run_handshake(None, None, check_s=check)
    assert isinstance(c, HandshakeError) and "block_size" in str(c)
    assert isinstance(s, HandshakeError) and "block_size" in str(s)


def test_frame_encoding(benchmark):
    meta = {"req": "request-0001", "segs": bytes(24 * 64), "notify": {"done": True}}
    out = benchmark(encode_frame, FrameType.WRITE, meta, 1 << 20)
    assert struct.unpack_from("<4s", out)[0] == MAGIC


@pytest.mark.parametrize("rid, cls, msg", [
    (7, TypeError, "request_id must be a str or None, got int 7"),
    (b"r1", TypeError, "got bytes"),
    ("é" * (MAX_REQUEST_ID // 2 + 1), ValueError, f"is {MAX_REQUEST_ID + 2} bytes long; the limit is {MAX_REQUEST_ID}"),
    ("\ud800", ValueError, "not valid text"),
])
def test_bad_request_ids_are_refused(rid, cls, msg):
    with pytest.raises(cls, match=msg):
        check_request_id(rid)


def test_good_request_ids_and_messages_pass():
    check_request_id(None)
    check_request_id("r" * MAX_REQUEST_ID)
    check_message({"done": True, "ids": [1, 2], "raw": b"x", "sub": {"k": None}})


@pytest.mark.parametrize("msg, text", [
    ([1, 2], "must be a dict of msgpack-able values, got list"),
    ({"k": {1: "v"}}, "int is not allowed for map key"),
    ({"k": {1, 2}}, "can not serialize 'set' object"),
    ({"k": 1 << 70}, "cannot be sent"),
])
def test_messages_the_peer_could_not_decode_are_refused(msg, text):
    with pytest.raises(TypeError, match=text):
        check_message(msg, "notify")
