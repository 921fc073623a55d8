"""P answers and pushes to the peer a message came from, never to an address written inside it:
the transport names each message's sender by its connection (`reply_address`: the listen port
its handshake announced, at the host the connection came from). Real sockets, one process."""
from __future__ import annotations

import select
import socket
import time
from typing import Any

import pytest

from p2pkv.connector import KVConnector
from p2pkv.transport import BackendUnavailable, Transport, get_transport
from p2pkv.transport.net import dial_back
from tests.test_connector import block_bytes, caches, step

BACKENDS = ["tcp", "nccl", "ucx"]


def transport_or_skip(backend: str, **kw: Any) -> Transport:
    try:
        return get_transport(backend, timeout=20, **kw)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def connector_or_skip(backend: str, **kw: Any) -> KVConnector:
    try:
        return KVConnector(backend, timeout=20, **kw)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def decoy() -> socket.socket:
    """A listener nobody should dial: a connection to it would wait in its backlog."""
    return socket.create_server(("127.0.0.1", 0))


def dialled(listener: socket.socket) -> bool:
    return bool(select.select([listener], [], [], 0.3)[0])


def answers(tr: Transport, p: KVConnector, kind: str, req: str, count: int = 1,
            timeout: float = 30.0) -> list[dict[str, Any]]:
    """Step P's engine until `tr` got `count` messages of `kind` about `req`."""
    got: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < end, f"{count} {kind!r} answer(s) for {req!r} expected, got {len(got)}"
        step(p)
        got += [n.message for n in tr.get_notifs() if n.message.get("p2pkv") == kind and n.message.get("req") == req]
        time.sleep(0.002)
    return got


def test_dial_back_takes_the_announced_port_at_the_connections_host():
    assert dial_back("10.0.0.7:53211", "0.0.0.0:5555") == "10.0.0.7:5555"
    assert dial_back("::1:40000", "[::]:6000") == "[::1]:6000"
    assert dial_back("::ffff:127.0.0.1:40000", "127.0.0.1:7000") == "127.0.0.1:7000"
    with pytest.raises(ValueError, match="listen"):
        dial_back("10.0.0.7:53211", "nonsense")
    with pytest.raises(ValueError, match="not an IP"):
        dial_back("?:0", "127.0.0.1:7000")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_message_is_named_by_the_connection_it_came_on(backend):
    """Either end of a connection can tell where the other listens: P (accepting) from D's handshake
    and the connection's source host, D (dialling) from the address it dialled."""
    p, d = transport_or_skip(backend), transport_or_skip(backend)
    try:
        for tr, seed in ((p, 1), (d, 2)):
            tr.register(*caches("vllm_cpu", 8, "zeros", seed=seed))
        peer = d.connect(p.address)
        d.send_notif(peer, {"hello": 1})
        end = time.monotonic() + 20
        notes: list = []
        while not notes:
            assert time.monotonic() < end, "P got no message"
            d.get_notifs()  # ucx sends a message once its flush completed, from the sender's next poll
            notes = p.get_notifs()
            time.sleep(0.002)
        assert p.reply_address(notes[0].peer) == d.address
        assert d.reply_address(peer.name) == p.address
        assert p.reply_address("someone@10.1.2.3:4") is None
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["held?", "sum?"])
def test_a_query_naming_another_address_is_answered_to_its_sender_only(backend, kind):
    """D's query carries the address of a third listener (as an old or hostile peer might write it):
    P answers D, on the connection D's handshake established, and never dials the third."""
    trap = decoy()
    p = connector_or_skip(backend, mode="pull")
    d = transport_or_skip(backend)
    try:
        p.register_kv_caches(*caches("vllm_cpu", 16, "random", seed=1))
        d.register(*caches("vllm_cpu", 16, "zeros"))
        p.save("r", [3, 1, 4])
        bogus = "%s:%d" % trap.getsockname()
        peer = d.connect(p.address)
        ask = {"p2pkv": kind, "req": "r", "addr": bogus} | ({"blocks": [3, 1, 4]} if kind == "sum?" else {})
        d.send_notif(peer, ask)
        (answer,) = answers(d, p, kind.rstrip("?"), "r")
        assert answer["gone"] is False
        if kind == "sum?":
            assert len(answer["sums"]) == p.num_layers and all(len(s) == 3 for s in answer["sums"])
        assert not dialled(trap)
    finally:
        p.close()
        d.close()
        trap.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_push_request_naming_another_address_is_written_into_its_sender(backend):
    """A Want whose `addr` names a third listener: P writes the blocks into the D that sent it (its
    bytes land there, one note per layer) and never dials the third."""
    trap = decoy()
    p = connector_or_skip(backend, mode="push")
    d = transport_or_skip(backend)
    try:
        pt, pspec = caches("vllm_cpu", 16, "random", seed=1)
        dt, dspec = caches("vllm_cpu", 12, "zeros")
        p.register_kv_caches(pt, pspec)
        d.register(dt, dspec)
        src, dst = [7, 3, 9], [2, 5, 6]
        peer = d.connect(p.address)
        d.send_notif(peer, {"p2pkv": "want", "req": "r", "blocks": dst, "offset": 0, "load": "mine",
                            "addr": "%s:%d" % trap.getsockname()})
        p.save("r", src)
        landed = answers(d, p, "landed", "r", count=p.num_layers)
        assert sorted(m["layer"] for m in landed) == list(range(p.num_layers))
        assert all(m["to"] == "mine" and m["n"] == 3 for m in landed)
        for s, t in zip(src, dst):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        assert not dialled(trap)
    finally:
        p.close()
        d.close()
        trap.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["nccl", "ucx"])
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_connectors_load_over_backends_whose_pull_asks_p(backend, mode):
    """nccl and ucx have no held reads: a pull load ends on P's answer to D's question, which P sends to
    the D its handshake named; a push lands in that D too."""
    p = connector_or_skip(backend, mode=mode)
    d = connector_or_skip(backend, mode=mode)
    try:
        pt, pspec = caches("vllm_cpu", 16, "random", seed=1)
        dt, dspec = caches("vllm_cpu", 12, "zeros")
        p.register_kv_caches(pt, pspec)
        d.register_kv_caches(dt, dspec)
        src, dst = [7, 3, 9, 10], [2, 5, 6, 0]
        p.save("r", src)
        d.load("r", dst, peer=p.address, remote_block_ids=src)
        end, loaded = time.monotonic() + 60, set()
        while "r" not in loaded:
            assert time.monotonic() < end, "load did not finish"
            step(p)
            f = d.get_finished()
            assert not f.failed, f.failed
            loaded |= f.loaded
            time.sleep(0.002)
        for s, t in zip(src, dst):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
    finally:
        p.close()
        d.close()
