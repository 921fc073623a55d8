"""The native handshake (csrc/net/accept.cpp, dial.cpp): it speaks the same frames as wire.py's
Python one (used with TLS), checks versions and tokens before anything else is read, and lets a
peer in and out without any Python thread of the transport having to run."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import threading
import time

import pytest

from kvcheck import assert_same, expected_after
from p2pkv import _native
from p2pkv.layout import make_kv_caches, plan_segments
from p2pkv.transport import Connecting, PeerClosedError, get_transport
from p2pkv.wire import (HEADER, MAGIC, AuthError, FrameType, HandshakeError, client_handshake, decode_meta,
                        encode_hello, recv_exact, server_handshake)
from procs import run_pinned

pytestmark = pytest.mark.timeout(60)


def cache(seed: int = 0):
    import torch
    return make_kv_caches("vllm", num_layers=2, num_blocks=16, block_size=4, num_kv_heads=2, head_size=8,
                          dtype=torch.float16, generator=torch.Generator().manual_seed(seed))


def test_native_mac_is_hmac_sha256():
    for key, data in ((b"k", b""), (b"secret" * 20, b"server" + bytes(range(64))), (b"\0", b"x" * 5000)):
        assert _native.hmac_sha256(key, data) == hmac.new(key, data, hashlib.sha256).digest()
    assert _native.hmac_available() == ""


def _python_client(address: str, token: bytes | None, info: dict | None = None):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        return client_handshake(s, info or {"name": "py"}, token, lambda i: None)


@pytest.mark.parametrize("token_c,token_p,error,message", [
    (None, None, None, None),
    (b"k", b"k", None, None),
    (b"k", None, AuthError, "an auth token is configured here but the peer has none"),
    (None, b"k", AuthError, "the peer requires an auth token and none is configured here"),
    (b"j", b"k", AuthError, "its auth token differs from ours"),
])
def test_python_client_against_the_native_acceptor(token_c, token_p, error, message, caplog):
    tensors, spec = cache()
    with get_transport("tcp", auth_token=token_p) as p:
        p.register(tensors, spec)
        if error is None:
            info = _python_client(p.address, token_c)
            assert info["backend"] == "tcp" and info["spec"] == spec.to_dict()
            return
        with caplog.at_level(logging.WARNING, logger="p2pkv.transport"):
            with pytest.raises(error, match=message):
                _python_client(p.address, token_c)
            end = time.monotonic() + 5
            while "refused connection" not in caplog.text and time.monotonic() < end:
                p.get_notifs()
                time.sleep(0.01)
        assert "refused connection from 127.0.0.1:" in caplog.text and "auth" in caplog.text


def _incompatible(info: dict) -> None:
    raise ValueError("KV layout mismatch: block_size 16 here, 32 on the peer")


@pytest.mark.parametrize("token_d,token_s,check,code", [
    (None, None, None, ""), (b"k", b"k", None, ""), (b"j", b"k", None, "auth"), (b"k", None, None, "auth"),
    (None, b"k", None, "auth"), (b"k", b"k", _incompatible, "refused"),
])
def test_native_dialer_against_the_python_acceptor(token_d, token_s, check, code):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got: dict = {}

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            try:
                got["info"] = server_handshake(conn, {"name": "P", "spec": {}}, token_s, check or (lambda i: None))
            except Exception as e:  # noqa: BLE001
                got["error"] = e
    t = threading.Thread(target=serve)
    t.start()
    d = _native.Dialer("127.0.0.1", port, b"\x81\xa4name\xa1D", token_d, 5.0)
    assert d.wait(10)
    c, message, meta, fd, info = d.take()
    t.join(10)
    server.close()
    assert c == code, message
    if code:
        assert fd == -1 and "info" not in got
        if code == "refused":
            assert decode_meta(meta) == {"kind": "handshake", "message": "KV layout mismatch: block_size 16 here, 32 on the peer"}
        return
    socket.socket(fileno=fd).close()
    assert decode_meta(info) == {"name": "P", "spec": {}} and got["info"] == {"name": "D"}


def test_an_older_protocol_version_is_told_so_and_refused():
    tensors, spec = cache()
    with get_transport("tcp") as p:
        p.register(tensors, spec)
        host, port = p.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            hello = encode_hello(b"\x80", bytes(32), False)
            s.sendall(HEADER.pack(MAGIC, 2, FrameType.HELLO, len(hello) - HEADER.size, 0) + hello[HEADER.size:])
            magic, version, ftype, mlen, _ = HEADER.unpack(recv_exact(s, HEADER.size))
            assert (magic, ftype) == (MAGIC, FrameType.ERROR)
            err = decode_meta(recv_exact(s, mlen))
            assert err["kind"] == "handshake" and "protocol version mismatch: peer speaks 2" in err["message"]
            try:
                assert s.recv(1) == b""  # closed (a reset, where the rest of its frame was left unread)
            except ConnectionResetError:
                pass


def test_a_peer_that_never_registered_is_told_so():
    with get_transport("tcp") as p, get_transport("tcp") as d:
        d.register(*cache())
        with pytest.raises(HandshakeError, match="no KV memory registered here yet"):
            d.connect(p.address)


def test_connect_async_is_polled_with_no_python_thread_and_the_peer_is_admitted_by_a_call():
    pt, ps = cache(1)
    dt, ds = cache(2)
    with get_transport("tcp") as p, get_transport("tcp") as d:
        p.register(pt, ps)
        d.register(dt, ds)
        original = [t.clone() for t in dt]
        before = {t.name for t in threading.enumerate()}
        c = d.connect_async(p.address)
        assert isinstance(c, Connecting)
        end = time.monotonic() + 10
        while not c.done() and time.monotonic() < end:
            time.sleep(0.001)
        assert c.done()
        started = {t.name for t in threading.enumerate()} - before
        assert not any("dial" in n or "handshake" in n for n in started), started
        peer = c.result()
        assert c.result() is peer and d.connect_async(p.address).result() == peer
        p.get_notifs()  # an engine's call admits the peer (the accept thread may have already)
        d.read(peer, plan_segments(peer.spec, ds, [3, 7], [1, 2]), "r").wait(10)
        assert_same(dt, expected_after("vllm", original, pt, [3, 7], [1, 2]))


def test_a_failed_dial_is_reported_through_result():
    with get_transport("tcp", timeout=2) as d:
        d.register(*cache())
        free = socket.create_server(("127.0.0.1", 0))
        address = f"127.0.0.1:{free.getsockname()[1]}"
        free.close()
        c = d.connect_async(address)
        assert c.wait(10)
        with pytest.raises(PeerClosedError, match="cannot connect"):
            c.result()
        with pytest.raises(PeerClosedError):
            c.result()


def test_a_silent_connection_ends_at_the_timeout_while_others_get_in(caplog):
    tensors, spec = cache()
    with get_transport("tcp", timeout=1) as p:
        p.register(tensors, spec)
        host, port = p.address.rsplit(":", 1)
        with caplog.at_level(logging.WARNING, logger="p2pkv.transport"):
            silent = [socket.create_connection((host, int(port))) for _ in range(20)]
            assert _python_client(p.address, None)["backend"] == "tcp"
            for s in silent:
                s.settimeout(5)
                assert s.recv(1) == b""  # closed by the acceptor at the timeout
                s.close()
            end = time.monotonic() + 5
            while caplog.text.count("no handshake within the timeout") < 20 and time.monotonic() < end:
                p.get_notifs()
                time.sleep(0.01)
        assert caplog.text.count("no handshake within the timeout") == 20


_AFFINITY = """
import threading
import torch
from p2pkv.layout import make_kv_caches
from p2pkv.transport import get_transport
t, s = make_kv_caches("vllm", num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_size=8, dtype=torch.float16)
with get_transport("tcp") as tr:
    tr.register(t, s)
    mine = {t.native_id for t in threading.enumerate()}
    native = [d for d in os.listdir("/proc/self/task") if int(d) not in mine]
    print(sorted({tuple(sorted(os.sched_getaffinity(int(d)))) for d in native}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("io_cpus,expect", [(None, "all"), ("1", [(1,)])])
def test_native_threads_do_not_inherit_the_engine_threads_pinning(io_cpus, expect):
    """An engine pins its compute thread to a core its OpenMP threads spin on; p2pkv's native
    threads (here the acceptor) take P2PKV_IO_CPUS or every CPU instead of that one core."""
    got = run_pinned(_AFFINITY, io_cpus)
    if expect == "all":
        assert got == [tuple(sorted(os.sched_getaffinity(0)))]
    else:
        assert got == expect
