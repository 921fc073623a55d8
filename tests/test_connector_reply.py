"""P answers and pushes to the peer a message came from, never to an address written inside it:
the transport names each message's sender by its connection (`reply_address`: the listen port
its handshake announced, at the host the connection came from). Real sockets, one process."""
from __future__ import annotations

import time
from typing import Any

import pytest

from p2pkv.transport import BackendUnavailable, Transport, get_transport
from p2pkv.transport.net import dial_back
from tests.test_connector import caches

BACKENDS = ["tcp", "nccl", "ucx"]


def transport_or_skip(backend: str, **kw: Any) -> Transport:
    try:
        return get_transport(backend, timeout=20, **kw)
    except BackendUnavailable as e:
        pytest.skip(str(e))


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


