"""cuda_ipc backend: the CPU-only refusal (in CI), and on a GPU two processes moving
KV blocks byte-exact by pull and by push, the same-host / peer-loss / bounds errors,
and the raw baseline."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pkv import kernels
from p2pkv.layout import plan_segments
from p2pkv.transport import BackendUnavailable, get_transport
from p2pkv.transport.base import PeerClosedError
from p2pkv.transport.cuda_ipc import host_id

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cuda_ipc_peer import build  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA or kernels.load() is None,
                         reason="needs a CUDA device and the built extension "
                                f"({kernels.unavailable_reason() if CUDA else 'no CUDA device here'})")


def test_cpu_only_machine_gets_a_clear_error():
    if CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="cuda_ipc needs a CUDA GPU.*use 'tcp'"):
        get_transport("cuda_ipc")


class _FakeEvent:
    cuda_event = 1234

    def __init__(self):
        self.complete = False

    def query(self):
        return self.complete


class _FakeExt:
    """Stands in for the CUDA extension: its wait says what the fake event says."""

    def __init__(self, ev):
        self.ev = ev

    def wait_event(self, ptr, timeout):
        assert ptr == _FakeEvent.cuda_event
        return self.ev.complete


def test_cuda_handle_completes_by_polling_its_event_and_takes_no_callbacks():
    """done() queries the CUDA event, wait() waits in the extension (a timeout says so); there are
    no completion callbacks: completion is polled."""
    from p2pkv.transport.base import TransferTimeout
    from p2pkv.transport.cuda_ipc import _CudaHandle
    ev = _FakeEvent()
    h = _CudaHandle("peer-x", "req-1", 64, ev, _FakeExt(ev))
    with pytest.raises(TransferTimeout, match="kernel not finished.*req-1|req-1"):
        h.wait(0.01)
    assert not h.done() and not hasattr(h, "add_done_callback")
    ev.complete = True
    assert h.done() and h.error is None
    h.wait(1)


def test_host_id_names_host_and_boot(monkeypatch):
    assert "/" in host_id()
    monkeypatch.setenv("P2PKV_HOST_ID", "elsewhere")
    assert host_id() == "elsewhere"


@contextmanager
def peer(cfg: dict, env: dict | None = None):
    import os
    proc = subprocess.Popen([sys.executable, str(HERE / "cuda_ipc_peer.py"), json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("ADDR "):
            raise RuntimeError(f"cuda_ipc peer failed to start: {line!r}")
        yield proc, line[5:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)


def ask(proc, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def expected(src_t, dst_t, layout, sb, db):
    bdim = 1 if layout == "vllm" else 0
    out = []
    for s, d in zip(src_t, dst_t):
        e = d.view(torch.uint8).clone()
        e.index_copy_(bdim, torch.as_tensor(db, device=e.device), s.view(torch.uint8).index_select(bdim, torch.as_tensor(sb, device=e.device)))
        out.append(e)
    return out


@gpu
@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout,dtype", [("vllm", "bf16"), ("block_first", "fp16"), ("cross_layer", "fp32"),
                                          ("mla", "bf16"), ("vllm_cpu", "int8")])
@pytest.mark.parametrize("blocks", [True, False], ids=["block-kernel", "segment-kernel"])
def test_pull_two_processes_byte_exact(layout, dtype, blocks, monkeypatch):
    monkeypatch.setitem(kernels.TUNING, "blocks", blocks)
    cfg = {"layout": layout, "dtype": dtype, "seed": 5, "blocks": 40}
    with peer(cfg) as (proc, addr):
        p_t, _ = build(cfg)
        d_t, d_spec = build({**cfg, "seed": 9})
        before = [t.clone() for t in d_t]
        tr = get_transport("cuda_ipc")
        try:
            tr.register(d_t, d_spec)
            pr = tr.connect(addr)
            rng = np.random.default_rng(1)
            for n in (1, 7, 30):
                sb, db = rng.choice(40, n, replace=False), rng.choice(40, n, replace=False)
                segs = plan_segments(pr.spec, d_spec, sb, db)
                tr.read(pr, segs, request_id=f"r{n}").wait(30)
                want = expected(p_t, before, layout, sb, db)
                for got, exp in zip(d_t, want):
                    assert torch.equal(got.view(torch.uint8), exp)
                before = [t.clone() for t in d_t]
            assert ask(proc, "mark") == "MARKED"
        finally:
            tr.close()


@gpu
@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_push_with_notify_two_processes(tmp_path):
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 3, "blocks": 64, "fill": "zeros"}
    with peer(cfg) as (proc, addr):
        p_t, p_spec = build({**cfg, "seed": 8, "fill": "random"})
        d_before, _ = build(cfg)
        tr = get_transport("cuda_ipc")
        try:
            tr.register(p_t, p_spec)
            dp = tr.connect(addr)
            rng = np.random.default_rng(2)
            sb, db = rng.choice(64, 50, replace=False), rng.choice(64, 50, replace=False)
            segs = plan_segments(p_spec, dp.spec, sb, db)
            tr.write(dp, segs, request_id="push-1", notify={"done": "push-1"}).wait(30)
            assert json.loads(ask(proc, "notif")[6:]) == {"done": "push-1"}
            assert ask(proc, f"dump {tmp_path / 'd.bin'}") == "DUMPED"
            got = np.frombuffer((tmp_path / "d.bin").read_bytes(), dtype=np.uint8)
            want = torch.cat([e.reshape(-1) for e in expected(p_t, d_before, "vllm", sb, db)]).cpu().numpy()
            assert np.array_equal(got, want)
        finally:
            tr.close()


@gpu
@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_errors_bounds_peer_loss_and_other_host():
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 5, "blocks": 16}
    d_t, d_spec = build({**cfg, "seed": 1})
    with get_transport("cuda_ipc") as cpu_tr, pytest.raises(ValueError, match="CUDA tensors only"):
        cpu_tr.register([t.cpu() for t in d_t], d_spec)
    with peer(cfg, env={"P2PKV_HOST_ID": "some-other-host"}) as (_, addr):
        tr = get_transport("cuda_ipc", timeout=10)
        try:
            tr.register(d_t, d_spec)
            with pytest.raises(Exception, match="needs P and D on one host"):
                tr.connect(addr)
        finally:
            tr.close()
    with peer(cfg) as (proc, addr):
        tr = get_transport("cuda_ipc", timeout=10)
        try:
            tr.register(d_t, d_spec)
            pr = tr.connect(addr)
            segs = plan_segments(pr.spec, d_spec, [1, 2], [3, 4])
            bad = type(segs)(segs.region, segs.src + (1 << 30), segs.dst, segs.length)
            with pytest.raises(ValueError, match="request 'bad'.*run past the end of source region"):
                tr.read(pr, bad, request_id="bad")
            tr.read(pr, segs, request_id="ok").wait(30)
            _, big_spec = build({**cfg, "blocks": 32})  # a plan for more blocks than the peer registered
            over = plan_segments(big_spec, d_spec, [20], [3])
            with pytest.raises(ValueError, match=r"request 'over'.*source block id 20 is outside the registered memory"):
                tr.read(pr, over, request_id="over")
            assert tr.baseline(pr, 1 << 20, 3) > 0
            proc.kill()
            proc.wait(timeout=20)
            import time
            deadline = time.time() + 10
            with pytest.raises(PeerClosedError, match="peer"):
                while time.time() < deadline:
                    tr.read(pr, segs, request_id="after-death").wait(10)
                    time.sleep(0.05)
        finally:
            tr.close()


@contextmanager
def same_process_pair(cfg: dict):
    """P and D transports in this process (they use each other's pointers directly): yields P's cache and
    spec, D's cache and spec, D's transport, D's peer for P, and P's transport."""
    p_t, p_spec = build(cfg)
    d_t, d_spec = build({**cfg, "seed": 4})
    p, d = get_transport("cuda_ipc"), get_transport("cuda_ipc")
    try:
        p.register(p_t, p_spec)
        d.register(d_t, d_spec)
        yield p_t, p_spec, d_t, d_spec, d, d.connect(p.address), p
    finally:
        d.close()
        p.close()


@gpu
@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_same_process_pair_uses_direct_pointers():
    import time
    cfg = {"layout": "block_first", "dtype": "bf16", "seed": 2, "blocks": 20}
    with same_process_pair(cfg) as (p_t, p_spec, d_t, d_spec, d, pr, p):
        before = [t.clone() for t in d_t]
        segs = plan_segments(p_spec, d_spec, [0, 5, 6], [1, 2, 19])
        h = d.read(pr, segs, request_id="same")
        deadline = time.time() + 10
        while not h.done() and time.time() < deadline:
            pass
        assert h.done() and h.error is None
        for got, exp in zip(d_t, expected(p_t, before, "block_first", [0, 5, 6], [1, 2, 19])):
            assert torch.equal(got.view(torch.uint8), exp)


@gpu
@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_wait_times_out_while_the_copy_is_queued_and_succeeds_after():
    from p2pkv.transport.base import TransferTimeout
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 2, "blocks": 20}
    with same_process_pair(cfg) as (p_t, p_spec, d_t, d_spec, d, pr, p):
        before = [t.clone() for t in d_t]
        segs = plan_segments(p_spec, d_spec, [3, 4], [7, 0])
        d.read(pr, segs, request_id="warm").wait(10)
        torch.cuda._sleep(1_500_000_000)  # the copy queues behind about a second of GPU sleep
        h = d.read(pr, segs, request_id="queued")
        with pytest.raises(TransferTimeout, match="not finished after 0.05 s"):
            h.wait(0.05)
        assert not h.done()
        h.wait(30)
        for got, exp in zip(d_t, expected(p_t, before, "vllm", [3, 4], [7, 0])):
            assert torch.equal(got.view(torch.uint8), exp)


@gpu
@pytest.mark.gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("pull", [True, False], ids=["read", "write"])
def test_one_layer_at_a_time_takes_the_block_kernel_and_touches_only_that_layer(pull):
    cfg = {"layout": "vllm", "dtype": "fp16", "seed": 6, "blocks": 24, "layers": 4}
    with same_process_pair(cfg) as (p_t, p_spec, d_t, d_spec, d, pr, p):
        pr_transport = None if pull else p.connect(d.address)
        sb, db = [5, 0, 17], [3, 22, 9]
        full = plan_segments(p_spec, d_spec, sb, db)
        for layer in (2, 0, 3, 1, 2):
            before = [t.clone() for t in d_t]
            m = np.isin(full.region, [layer])
            segs = type(full)(full.region[m], full.src[m], full.dst[m], full.length[m], full.plan.only([layer]))
            if pull:
                d.read(pr, segs, request_id=f"layer-{layer}").wait(10)
            else:
                p.write(pr_transport, segs, request_id=f"layer-{layer}").wait(10)
            want = expected(p_t, before, "vllm", sb, db)
            for i, (got, exp, old) in enumerate(zip(d_t, want, before)):
                assert torch.equal(got.view(torch.uint8), exp if i == layer else old.view(torch.uint8))
        side, peer = (d, pr) if pull else (p, pr_transport)
        keys = [k for k in side._conn(peer).extra if isinstance(k, tuple)]
        assert (pull, (2,)) in keys and (pull, (0,)) in keys
