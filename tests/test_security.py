"""Hostile peers against a live listener, and mutual TLS: nothing a bad peer sends
crashes the process or stops a well-behaved peer from completing its transfer."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import numpy as np
import pytest
import torch

from kvcheck import assert_same, expected_after
from p2pkv.layout import make_kv_caches, plan_segments
from p2pkv.transport import PeerClosedError, TransferError, control, get_transport, ops
from p2pkv.wire import HEADER, MAGIC, VERSION, FrameType, encode_frame


def cache(seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return make_kv_caches("vllm", num_layers=2, num_blocks=16, block_size=4, num_kv_heads=2, head_size=8,
                          dtype="bf16", fill="random" if g else "zeros", generator=g)


def good_transfer(p_addr, p_tensors, **opts):
    d_tensors, d_spec = cache()
    before = [t.clone() for t in d_tensors]
    with get_transport("tcp", **opts) as d:
        d.register(d_tensors, d_spec)
        peer = d.connect(p_addr)
        d.read(peer, plan_segments(peer.spec, d_spec, [1, 5, 9], [0, 2, 15]), "good").wait(10)
    assert_same(d_tensors, expected_after("vllm", before, p_tensors, [1, 5, 9], [0, 2, 15]))


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 3,
    HEADER.pack(MAGIC, VERSION, FrameType.HELLO, 0xFFFFFFFF, 0),
    HEADER.pack(MAGIC, VERSION, FrameType.HELLO, 10, 1 << 62),
    HEADER.pack(MAGIC, VERSION, FrameType.HELLO, 100, 0) + b"\x81",
    encode_frame(FrameType.WRITE, {"req": "x", "segs": b"\0" * 24}, payload_len=1 << 30),
    encode_frame(FrameType.HELLO, {"info": "nope", "nonce": b"1"}),
    encode_frame(FrameType.HELLO, {"info": {"backend": "tcp", "spec": {"regions": 5}}, "nonce": b"\0" * 32}),
    HEADER.pack(MAGIC, VERSION + 7, FrameType.HELLO, 0, 0),
]


@pytest.mark.timeout(60)
def test_garbage_half_frames_and_huge_lengths_then_a_good_peer_completes():
    pt, ps = cache(seed=1)
    with get_transport("tcp", timeout=2) as p:
        p.register(pt, ps)
        host, port = p.address.split(":")
        stalled = []
        for raw in GARBAGE:
            s = socket.create_connection((host, int(port)))
            s.sendall(raw)
            stalled.append(s)  # keep some half-open: the listener must not wait on them
        good_transfer(p.address, pt)
        for s in stalled:
            s.close()
        # an authenticated-looking peer that sends an out-of-range write after a valid handshake
        d_tensors, d_spec = cache(seed=3)
        with get_transport("tcp") as d:
            d.register(d_tensors, d_spec)
            peer = d.connect(p.address)
            segs = plan_segments(d_spec, peer.spec, [1], [1])
            from p2pkv.segments import Segments
            evil = Segments(segs.region, segs.src, segs.dst + 10 ** 9, segs.length)
            with pytest.raises(TransferError):
                d.write(peer, evil, "evil-write").wait(10)
        assert torch.equal(torch.cat([t.view(-1) for t in pt]).view(torch.uint8),
                           torch.cat([t.view(-1) for t in cache(seed=1)[0]]).view(torch.uint8))
        good_transfer(p.address, pt)


@pytest.mark.timeout(60)
def test_random_bytes_fuzz_against_a_live_listener():
    pt, ps = cache(seed=2)
    rng = np.random.default_rng(0)
    with get_transport("tcp", timeout=1) as p:
        p.register(pt, ps)
        host, port = p.address.split(":")
        for i in range(60):
            s = socket.create_connection((host, int(port)))
            n = int(rng.integers(0, 200))
            prefix = HEADER.pack(MAGIC, VERSION, int(rng.integers(0, 12)), int(rng.integers(0, 64)),
                                 int(rng.integers(0, 1 << 40))) if i % 2 else b""
            try:
                s.sendall(prefix + rng.bytes(n))
            except OSError:
                pass
            s.close()
        good_transfer(p.address, pt)


def make_certs(tmp, names):
    """A CA and certificates it signs, made with the openssl command."""
    run = lambda *a: subprocess.run(["openssl", *a], cwd=tmp, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=p2pkv-test-ca")
    for n in names:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{n}.key", "-out", f"{n}.csr", "-subj", f"/CN={n}")
        run("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{n}.pem", "-days", "1")
    return {n: dict(tls_cert=str(tmp / f"{n}.pem"), tls_key=str(tmp / f"{n}.key"), tls_ca=str(tmp / "ca.pem"))
            for n in names}


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_mutual_tls_transfers_and_refuses_plaintext_and_foreign_certs(tmp_path):
    certs = make_certs(tmp_path, ["p", "d"])
    other = tmp_path / "other"
    other.mkdir()
    foreign = make_certs(other, ["x"])["x"]
    pt, ps = cache(seed=4)
    with get_transport("tcp", timeout=3, **certs["p"]) as p:
        p.register(pt, ps)
        good_transfer(p.address, pt, **certs["d"])
        for opts in ({}, foreign):
            d_tensors, d_spec = cache()
            with get_transport("tcp", timeout=3, **opts) as d:
                d.register(d_tensors, d_spec)
                with pytest.raises((PeerClosedError, TransferError)):
                    d.connect(p.address)
        good_transfer(p.address, pt, **certs["d"])
    with pytest.raises(ValueError, match="tls_cert, tls_key and tls_ca"):
        get_transport("tcp", tls_cert=certs["p"]["tls_cert"])


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
@pytest.mark.parametrize("post_read", [False, True])
def test_close_before_the_tls_op_thread_runs_raises_in_no_thread(tmp_path, monkeypatch, post_read):
    """Issue 20: `Exception in thread p2pkv-tcp-op: OSError: [Errno 9] Bad file descriptor` on a close()
    right after connect(). A TLS connection is driven by a Python op thread, whose first step set its
    socket's timeout; a close() that got there first had already closed the socket. The op thread is
    held back here until close() has closed the socket, which a busy host does by descheduling it."""
    certs = make_certs(tmp_path, ["p", "d"])
    sock_closed = threading.Event()
    real_close, real_off = control.Conn.close, ops.off_engine_cpus

    def close_and_tell(conn):
        real_close(conn)
        sock_closed.set()

    def op_thread_late():
        if threading.current_thread().name == "p2pkv-tcp-op":
            sock_closed.wait(10)
        real_off()
    monkeypatch.setattr(control.Conn, "close", close_and_tell)
    monkeypatch.setattr(ops, "off_engine_cpus", op_thread_late)
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(f"{a.thread.name}: {a.exc_type.__name__}: "
                                                                       f"{a.exc_value}"))
    pt, ps = cache(seed=4)
    dt, ds = cache()
    with get_transport("tcp", timeout=3, **certs["p"]) as p:
        p.register(pt, ps)
        d = get_transport("tcp", timeout=3, **certs["d"])
        d.register(dt, ds)
        peer = d.connect(p.address)
        op = [t for t in threading.enumerate() if t.name == "p2pkv-tcp-op"]
        h = d.read(peer, plan_segments(peer.spec, ds, [1, 5], [0, 2]), "r") if post_read else None
        d.close()
    for t in op:
        t.join(5)
    assert op and not any(t.is_alive() for t in op)
    assert died == []
    if h is not None:
        with pytest.raises(PeerClosedError):
            h.wait(5)


UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
UNPICKLING_CALLS = {"send_object_list", "recv_object_list", "broadcast_object_list", "all_gather_object",
                    "gather_object", "scatter_object_list", "load"}


def test_no_module_of_the_package_can_unpickle():
    """docs/security.md's promise: nothing that crosses a process is unpickled. No p2pkv module imports a
    pickling module, calls torch.distributed's object collectives (pickle underneath) or torch.load."""
    import ast
    import pathlib

    import p2pkv
    root = pathlib.Path(p2pkv.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in UNPICKLING_MODULES]
            if isinstance(node, ast.Attribute) and node.attr in UNPICKLING_CALLS and not (
                    node.attr == "load" and not (isinstance(node.value, ast.Name) and node.value.id == "torch")):
                found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    assert len(list(root.rglob("*.py"))) > 20 and found == []


def test_a_connection_closed_before_its_serving_thread_starts_is_dropped_not_raised():
    """The Python serving loop of a connection closed before it ran (close() racing its start) must drop
    the connection with the reason, raising nothing in the thread."""
    from types import SimpleNamespace as NS

    from p2pkv.transport.serving import serve_loop
    a, b = socket.socketpair()
    a.close()
    b.close()
    dropped = []
    tr = NS(_closed=threading.Event(), name="tcp", _drop=lambda conn, e: dropped.append(e))
    serve_loop(tr, NS(sock=a, dead=None, peer=NS(name="peer-1")))
    assert len(dropped) == 1 and isinstance(dropped[0], ValueError)
