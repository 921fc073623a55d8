"""Dead and stalled peers with real processes: errors name the peer and request within
the timeout, and the survivor keeps serving others."""
from __future__ import annotations

import importlib.util
import os
import signal
import time

import numpy as np
import pytest
import torch

from p2pkv.layout import plan_segments
from p2pkv.transport import PeerClosedError, TransferError, TransferTimeout, get_transport
from peer import build
from procs import peer_process, stop_process, wait_errors

SOCKET_BACKENDS = ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed (pip install 'p2pkv[ucx]')"))]
BIG = {"layout": "vllm", "dtype": "fp32", "blocks": 256, "layers": 8, "block_size": 16, "heads": 8, "head_size": 64}


def push_forever(tr, peer, spec, tag, n=30):
    return [tr.write(peer, plan_segments(spec, peer.spec, np.arange(256), np.arange(256)), f"{tag}-{i}")
            for i in range(n)]


@pytest.mark.timeout(90)
def test_decode_killed_mid_push_fails_within_timeout_and_prefill_serves_the_next():
    with peer_process("tcp", [BIG]) as d1, peer_process("tcp", [BIG]) as d2:
        tensors, spec = build({**BIG, "seed": 7})
        with get_transport("tcp", timeout=3) as p:
            p.register(tensors, spec)
            peer1 = p.connect(d1.addresses[0])
            handles = push_forever(p, peer1, spec, "to-d1")
            os.kill(d1.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            errors = wait_errors(handles)
            assert time.monotonic() - t0 < 8
            assert errors and isinstance(errors[-1], (PeerClosedError, TransferTimeout))
            assert d1.addresses[0] in str(errors[-1]) and "to-d1-29" in str(errors[-1])
            peer2 = p.connect(d2.addresses[0])
            p.write(peer2, plan_segments(spec, peer2.spec, [1, 2], [3, 4]), "to-d2").wait(10)
            assert p.peers() == [peer2]


@pytest.mark.timeout(90)
def test_peer_that_stops_reading_times_out_instead_of_hanging():
    with peer_process("tcp", [BIG]) as d:
        tensors, spec = build({**BIG, "seed": 8})
        with get_transport("tcp", timeout=2) as p:
            p.register(tensors, spec)
            peer = p.connect(d.addresses[0])
            stop_process(d.proc.pid)
            try:
                t0 = time.monotonic()
                handles = push_forever(p, peer, spec, "stalled", n=10)
                with pytest.raises(TransferTimeout, match="stalled-0"):
                    handles[0].wait(15)
                assert time.monotonic() - t0 < 10
                for h in handles[1:]:
                    with pytest.raises(TransferError):
                        h.wait(5)
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", SOCKET_BACKENDS)
def test_peer_killed_mid_read_fails_pending_requests_with_peer_and_request(backend):
    cfg = {**BIG, "blocks": 512}
    # ucx over shared memory (cma) reads P's memory itself, so P's death shows only over a network
    opts = {"ucx_config": {"TLS": "tcp"}} if backend == "ucx" else {}
    with peer_process(backend, [cfg], opts) as p:
        d, spec = build({**cfg, "seed": 1})
        with get_transport(backend, timeout=5, **opts) as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])

            def big(i):
                return tr.read(peer, plan_segments(peer.spec, spec, np.arange(512), np.arange(512)), f"big-{i}")
            big(0).wait(20)
            handles = [big(i) for i in range(1, 20)]  # 19 x 256 MiB: still in flight when P dies
            os.kill(p.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            errors = wait_errors(handles)
            assert time.monotonic() - t0 < 10
            assert errors, "killing P must fail the requests still in flight"
            assert all(isinstance(e, (PeerClosedError, TransferTimeout)) for e in errors)
            assert errors[-1].request_id == "big-19" and p.addresses[0] in str(errors[-1])
            late = tr.read(peer, plan_segments(peer.spec, spec, [0], [0]), "late")
            with pytest.raises(PeerClosedError, match="late"):
                late.wait(5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", [*SOCKET_BACKENDS, "nccl"])
def test_bad_request_arguments_are_refused_at_entry_on_every_cpu_backend(backend):
    """Backends with their own read/write (nccl, ucx) make the control plane's entry checks too,
    and the connection still moves good requests afterwards."""
    from p2pkv.segments import Segments
    cfg = {"layout": "vllm", "dtype": "fp32", "blocks": 24, "layers": 2, "block_size": 4, "heads": 2, "head_size": 8}
    with peer_process(backend, [cfg]) as p:
        d, spec = build({**cfg, "seed": 2})
        p_tensors, _ = build(cfg)
        with get_transport(backend, timeout=10) as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])
            segs = plan_segments(peer.spec, spec, [1], [2])
            one = np.array([0])
            for call, exc, why in [
                (lambda: tr.read(peer, segs, 123), TypeError, "request_id must be a str or None, got int"),
                (lambda: tr.read(peer, segs, "x" * 2000), ValueError, "the limit is 1024"),
                (lambda: tr.write(peer, segs, "w", notify={"k": object()}), TypeError, "notify cannot be sent"),
                (lambda: tr.write(peer, segs, "w", notify=["done"]), TypeError, "notify must be a dict"),
                (lambda: tr.read(peer, None, "r"), TypeError, "segments must be a p2pkv Segments"),
                (lambda: tr.read(peer, Segments(one, one * 0.5, one, one + 16), "r"), TypeError,
                 "Segments.src must be a 1-D numpy array of integers"),
            ]:
                with pytest.raises(exc, match=why):
                    call()
            tr.read(peer, segs, "good").wait(20)
            assert torch.equal(d[0][:, 2].view(torch.uint8), p_tensors[0][:, 1].view(torch.uint8))
