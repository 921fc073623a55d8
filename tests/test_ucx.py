"""UCX backend across real processes on host memory: byte-exact reads and writes
for every layout, concurrent requests to one peer, peers that die or stall, the
idle cost of the progress thread, and a clear error when ucxx is missing."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kvcheck import assert_same, expected_after
from p2pkv.layout import PRESETS, make_kv_caches, plan_segments
from p2pkv.segments import Segments
from p2pkv.transport import TransferTimeout, get_transport
from peer import build
from procs import peer_process, run_pinned, stop_process

HAVE_UCXX = importlib.util.find_spec("ucxx") is not None
needs_ucxx = pytest.mark.skipif(not HAVE_UCXX, reason="ucxx is not installed (pip install 'p2pkv[ucx]')")
DTYPES = ["bf16", "fp32"] + (["fp8"] if hasattr(torch, "float8_e4m3fn") else [])


def local_cache(cfg: dict, seed: int = 777):
    return build({**cfg, "seed": seed})


def _cache(layout="vllm", **kw):
    args = dict(num_layers=2, num_blocks=24, block_size=4, num_kv_heads=2, head_size=8, dtype="bf16", fill="zeros")
    args.update(kw)
    return make_kv_caches(layout, **args)


STAGED = {"path": "staged", "staging_bytes": 1 << 16}
PATH_OPTIONS = [pytest.param({"path": "put"}, id="put"), pytest.param(STAGED, id="staged")]


@needs_ucxx
@pytest.mark.timeout(120)
@pytest.mark.parametrize("opts", PATH_OPTIONS)
def test_read_every_layout_is_byte_exact_and_leaves_other_blocks_alone(opts):
    configs = [{"layout": lay, "dtype": dt, "seed": i} for i, (lay, dt) in
               enumerate((lay, dt) for lay in PRESETS for dt in DTYPES)]
    rng = np.random.default_rng(0)
    with peer_process("ucx", configs, opts) as p:
        for cfg, addr in zip(configs, p.addresses):
            d_tensors, d_spec = local_cache(cfg)
            before = [t.clone() for t in d_tensors]
            p_tensors, _ = build(cfg)
            with get_transport("ucx", timeout=20, **opts) as tr:
                tr.register(d_tensors, d_spec)
                peer = tr.connect(addr)
                n = int(rng.integers(1, 12))
                src, dst = rng.choice(24, n, replace=False), rng.choice(24, n, replace=False)
                tr.read(peer, plan_segments(peer.spec, d_spec, src, dst), request_id=f"{cfg}").wait(20)
            assert_same(d_tensors, expected_after(cfg["layout"], before, p_tensors, src, dst))


@needs_ucxx
@pytest.mark.timeout(90)
@pytest.mark.parametrize("opts", PATH_OPTIONS)
def test_write_lands_in_exactly_the_destination_blocks_for_every_layout(tmp_path, opts):
    configs = [{"layout": lay, "dtype": "bf16", "seed": 5 + i} for i, lay in enumerate(PRESETS)]
    with peer_process("ucx", configs, opts) as p:
        for i, (cfg, addr) in enumerate(zip(configs, p.addresses)):
            mine, spec = local_cache(cfg, seed=99)
            theirs_before, _ = build(cfg)
            with get_transport("ucx", timeout=20, **opts) as tr:
                tr.register(mine, spec)
                peer = tr.connect(addr)
                src, dst = [3, 4, 5, 17], [20, 2, 9, 10]
                tr.write(peer, plan_segments(spec, peer.spec, src, dst), "w1", notify={"req": "w1"}).wait(20)
                raw = p.dump(i, tmp_path / f"p{i}.bin")
            expect = expected_after(cfg["layout"], theirs_before, mine, src, dst)
            got = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            assert torch.equal(got, torch.cat([e.reshape(-1) for e in expect])), cfg["layout"]


@needs_ucxx
@pytest.mark.timeout(60)
@pytest.mark.parametrize("opts", PATH_OPTIONS)
def test_concurrent_requests_to_one_peer_do_not_mix(opts):
    cfg = {"layout": "block_first", "dtype": "fp16", "seed": 3, "blocks": 64}
    with peer_process("ucx", [cfg], opts) as p:
        d, spec = local_cache(cfg)
        before = [t.clone() for t in d]
        ptens, _ = build(cfg)
        with get_transport("ucx", timeout=20, **opts) as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])
            perm = np.random.default_rng(1).permutation(64)
            handles, src_all, dst_all = [], [], []
            for r in range(8):
                src, dst = perm[r * 8:(r + 1) * 8], np.roll(perm, 5)[r * 8:(r + 1) * 8]
                handles.append(tr.read(peer, plan_segments(peer.spec, spec, src, dst), f"req-{r}"))
                src_all += list(src)
                dst_all += list(dst)
            handles.append(tr.read(peer, Segments.empty(), "empty"))
            for h in handles:
                h.wait(20)
                assert h.done() and h.error is None
        assert_same(d, expected_after("block_first", before, ptens, src_all, dst_all))


@needs_ucxx
@pytest.mark.timeout(60)
def test_staged_requests_of_many_chunks_both_directions_between_two_processes(tmp_path):
    """Larger blocks and 64 KiB slots: a request is dozens of chunks through the two-slot ring each way."""
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 4, "layers": 4, "blocks": 64, "block_size": 16, "heads": 4,
           "head_size": 64}
    with peer_process("ucx", [cfg], STAGED) as p:
        d, spec = local_cache(cfg)
        before = [t.clone() for t in d]
        ptens, _ = build(cfg)
        rng = np.random.default_rng(7)
        src, dst = rng.choice(64, 40, replace=False), rng.choice(64, 40, replace=False)
        with get_transport("ucx", timeout=20, **STAGED) as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])
            tr.read(peer, plan_segments(peer.spec, spec, src, dst), "many-chunks").wait(20)
            assert_same(d, expected_after("vllm", before, ptens, src, dst))
            back = rng.choice(64, 30, replace=False)
            tr.write(peer, plan_segments(spec, peer.spec, dst[:30], back), "many-back").wait(20)
            raw = p.dump(0, tmp_path / "p.bin")
        expect = expected_after("vllm", ptens, d, dst[:30], back)
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                           torch.cat([e.reshape(-1) for e in expect]))


@needs_ucxx
@pytest.mark.timeout(60)
def test_staged_reads_in_both_directions_at_once_do_not_deadlock_or_mix():
    a, b = get_transport("ucx", timeout=10, **STAGED), get_transport("ucx", timeout=10, **STAGED)
    try:
        shape = dict(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=4, head_size=64)
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(1), **shape)
        tb, sb = _cache(fill="random", generator=torch.Generator().manual_seed(2), **shape)
        a0, b0 = [t.clone() for t in ta], [t.clone() for t in tb]
        a.register(ta, sa)
        b.register(tb, sb)
        pa, pb = b.connect(a.address), a.connect(b.address)
        hs = []
        for r in range(4):
            blocks = list(range(r * 8, r * 8 + 8))
            hs.append(b.read(pa, plan_segments(sa, sb, blocks, [x + 32 for x in blocks]), f"b<-a {r}"))
            hs.append(a.read(pb, plan_segments(sb, sa, blocks, [x + 32 for x in blocks]), f"a<-b {r}"))
        for h in hs:
            h.wait(20)
        moved = list(range(32))
        assert_same(tb, expected_after("vllm", b0, a0, moved, [x + 32 for x in moved]))
        assert_same(ta, expected_after("vllm", a0, b0, moved, [x + 32 for x in moved]))
    finally:
        a.close()
        b.close()


def test_staged_chunks_cover_every_byte_in_order_within_the_slot():
    from p2pkv.transport.ucx.staged import plan_chunks
    rng = np.random.default_rng(3)
    for slot in (1 << 16, 3 << 16, 1 << 20):
        n = int(rng.integers(1, 400))
        length = rng.integers(1, 3 * slot, n)
        off = rng.integers(0, 1 << 30, n)
        region = rng.integers(0, 4, n)
        chunks = plan_chunks(region, off, length, slot)
        assert all(0 < int(c[3]) <= slot for c in chunks)
        r = np.concatenate([c[0] for c in chunks])
        o = np.concatenate([c[1] for c in chunks])
        ln = np.concatenate([c[2] for c in chunks])
        assert int(ln.sum()) == int(length.sum()) and ln.max() <= slot // 8
        start = np.concatenate([[0], np.cumsum(length)[:-1]])
        seg = np.searchsorted(start, np.concatenate([[0], np.cumsum(ln)[:-1]]), side="right") - 1
        assert np.array_equal(r, region[seg]) and np.array_equal(o - off[seg] + start[seg],
                                                                np.concatenate([[0], np.cumsum(ln)[:-1]]))
    assert plan_chunks(np.zeros(0), np.zeros(0), np.zeros(0), 1 << 16) == []


@needs_ucxx
@pytest.mark.timeout(60)
def test_a_staged_side_and_a_put_side_agree_on_puts():
    a = get_transport("ucx", timeout=10, **STAGED)
    b = get_transport("ucx", timeout=10, path="put")
    try:
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(1))
        tb, sb = _cache()
        a.register(ta, sa)
        b.register(tb, sb)
        assert (a.path, b.path) == ("staged", "put")
        b.read(b.connect(a.address), plan_segments(sa, sb, [1, 2], [3, 4]), "mixed").wait(10)
        a.write(a.connect(b.address), plan_segments(sa, sb, [5], [6]), "mixed-w").wait(10)
        for la, lb in zip(ta, tb):
            assert torch.equal(la[:, [1, 2, 5]].view(torch.uint8), lb[:, [3, 4, 6]].view(torch.uint8))
    finally:
        a.close()
        b.close()


@needs_ucxx
@pytest.mark.timeout(60)
def test_both_directions_and_notifs_between_two_transports_of_one_process():
    a, b = get_transport("ucx", timeout=10), get_transport("ucx", timeout=10)
    try:
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(1))
        tb, sb = _cache(fill="random", generator=torch.Generator().manual_seed(2))
        a.register(ta, sa)
        b.register(tb, sb)
        pa, pb = b.connect(a.address), a.connect(b.address)
        b.read(pa, plan_segments(sa, sb, [1, 2], [3, 4]), "b-reads").wait(10)
        a.write(pb, plan_segments(sa, sb, [5], [6]), "a-writes", notify={"landed": 6}).wait(10)
        b.write(pa, plan_segments(sb, sa, [7], [8]), "b-writes").wait(10)
        for la, lb in zip(ta, tb):
            assert torch.equal(la[:, [1, 2, 5]].view(torch.uint8), lb[:, [3, 4, 6]].view(torch.uint8))
            assert torch.equal(lb[:, 7].view(torch.uint8), la[:, 8].view(torch.uint8))
        got, end = [], time.monotonic() + 10
        while not got and time.monotonic() < end:  # the notify leaves once the write's flush ended: poll
            got = [n.message for n in a.get_notifs() + b.get_notifs()]
        assert got == [{"landed": 6}]
        assert b.baseline(pa, 1 << 20, 2) > 0
    finally:
        a.close()
        b.close()


@pytest.mark.slow
@needs_ucxx
@pytest.mark.timeout(90)
def test_server_survives_a_reader_killed_mid_transfer_and_serves_the_next_one():
    shape = dict(num_layers=8, num_blocks=256, block_size=16, num_kv_heads=8, head_size=64)
    ptens, pspec = _cache(fill="random", generator=torch.Generator().manual_seed(3), **shape)
    reader = (
        "import sys, numpy as np\n"
        "from p2pkv.layout import make_kv_caches, plan_segments\n"
        "from p2pkv.transport import get_transport\n"
        f"t, s = make_kv_caches('vllm', dtype='bf16', fill='zeros', **{shape!r})\n"
        "tr = get_transport('ucx', timeout=10); tr.register(t, s); peer = tr.connect(sys.argv[1])\n"
        "print('READING', flush=True)\n"
        "while True:\n"
        "    tr.read(peer, plan_segments(peer.spec, s, np.arange(256), np.arange(256)), 'doomed').wait(30)\n")
    with get_transport("ucx", timeout=5) as server:
        server.register(ptens, pspec)
        proc = subprocess.Popen([sys.executable, "-c", reader, server.address], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "READING"  # type: ignore[union-attr]
            time.sleep(0.5)
            proc.kill()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        time.sleep(0.5)
        d, dspec = _cache(**shape)
        with get_transport("ucx", timeout=10) as tr:
            tr.register(d, dspec)
            peer = tr.connect(server.address)
            tr.read(peer, plan_segments(pspec, dspec, [5, 6], [7, 8]), "after-kill").wait(10)
        for a, b in zip(ptens, d):
            assert torch.equal(a[:, [5, 6]].view(torch.uint8), b[:, [7, 8]].view(torch.uint8))


@needs_ucxx
@pytest.mark.timeout(90)
def test_reads_are_one_sided_a_stalled_peer_times_out_and_other_peers_are_unaffected():
    """With cma a read is D's own process_vm_readv: a P stopped by SIGSTOP still yields its bytes. Over TCP only,
    UCX emulates the GET with messages that P's progress thread must answer: reads from a stopped P fail with
    TransferTimeout near the timeout, while reads from another P go on."""
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 2}
    timeout = 4.0
    d, spec = local_cache(cfg)
    ptens, _ = build(cfg)
    with peer_process("ucx", [cfg]) as p:
        with get_transport("ucx", timeout=timeout) as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])
            # UCX connects lazily, lane by lane: wire up with a read of the size read from the stopped P below
            tr.read(peer, plan_segments(peer.spec, spec, [0, 1], [0, 1]), "wire-up").wait(20)
            before = [t.clone() for t in d]
            stop_process(p.proc.pid)
            try:
                tr.read(peer, plan_segments(peer.spec, spec, [2, 3], [4, 5]), "from-a-stopped-P").wait(20)
            finally:
                os.kill(p.proc.pid, signal.SIGCONT)
            assert_same(d, expected_after("vllm", before, ptens, [2, 3], [4, 5]))
    tcp = {"ucx_config": {"TLS": "tcp"}}
    with peer_process("ucx", [cfg], tcp) as stalled, peer_process("ucx", [cfg], tcp) as fine:
        with get_transport("ucx", timeout=timeout, **tcp) as tr:
            tr.register(d, spec)
            slow, good = tr.connect(stalled.addresses[0]), tr.connect(fine.addresses[0])
            tr.read(slow, plan_segments(slow.spec, spec, [1], [1]), "warm").wait(30)
            stop_process(stalled.proc.pid)
            try:
                t0 = time.monotonic()
                h = tr.read(slow, plan_segments(slow.spec, spec, [2, 3], [4, 5]), "stalled")
                before = [t.clone() for t in d]
                tr.read(good, plan_segments(good.spec, spec, [6, 7], [8, 9]), "meanwhile").wait(10)
                assert_same(d, expected_after("vllm", before, ptens, [6, 7], [8, 9]))
                with pytest.raises(TransferTimeout, match="stalled"):
                    h.wait(30)
                assert time.monotonic() - t0 < timeout + 10, "a stalled peer must fail the request near the timeout"
            finally:
                os.kill(stalled.proc.pid, signal.SIGCONT)


BUSY_P = (
    "import sys, threading, torch\n"
    "from p2pkv.layout import make_kv_caches\n"
    "from p2pkv.transport import get_transport\n"
    "t, s = make_kv_caches('vllm', dtype='bf16', fill='random', generator=torch.Generator().manual_seed(11), "
    "**SHAPE)\n"
    "tr = get_transport('ucx', timeout=20); tr.register(t, s)\n"
    "def engine():  # pure Python: holds the GIL but for the interpreter's switch interval\n"
    "    x = 0\n"
    "    while True:\n"
    "        x = (x * 31 + 7) % 1000003\n"
    "threading.Thread(target=engine, daemon=True).start()\n"
    "print('ADDR', tr.address, flush=True)\n"
    "sys.stdin.read()\n")


@needs_ucxx
@pytest.mark.timeout(90)
def test_reads_and_writes_complete_while_the_peers_python_is_busy():
    """P's process spins a pure-Python thread (an engine's busy main thread); D's reads, and writes read back,
    are byte-exact: no Python of P's has to run for either."""
    shape = dict(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=4, head_size=64)
    ptens, pspec = _cache(fill="random", generator=torch.Generator().manual_seed(11), **shape)
    d, dspec = _cache(**shape)
    code = BUSY_P.replace("**SHAPE", "**" + repr(shape))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert line and line[0] == "ADDR", line
        rng = np.random.default_rng(5)
        with get_transport("ucx", timeout=20) as tr:
            tr.register(d, dspec)
            peer = tr.connect(line[1])
            for r in range(4):
                before = [t.clone() for t in d]
                src, dst = rng.choice(64, 24, replace=False), rng.choice(64, 24, replace=False)
                tr.read(peer, plan_segments(pspec, dspec, src, dst), f"busy-{r}").wait(20)
                assert_same(d, expected_after("vllm", before, ptens, src, dst))
            mine = torch.Generator().manual_seed(12)
            for t in d:
                t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8,
                                                        generator=mine))
            sent = [t.clone() for t in d]
            tr.write(peer, plan_segments(dspec, pspec, [1, 2, 3], [40, 41, 42]), "busy-w", notify={"n": 1}).wait(20)
            tr.read(peer, plan_segments(pspec, dspec, [40, 41, 42], [10, 11, 12]), "busy-back").wait(20)
            for a, b in zip(sent, d):
                assert torch.equal(a[:, [1, 2, 3]].view(torch.uint8), b[:, [10, 11, 12]].view(torch.uint8))
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
@needs_ucxx
@pytest.mark.timeout(60)
def test_idle_connected_pair_does_not_spin_a_core():
    """The blocking progress thread sleeps in epoll: a connected, idle process uses a small fraction of a core."""
    code = (
        "import time, resource, torch\n"
        "from p2pkv.layout import make_kv_caches, plan_segments\n"
        "from p2pkv.transport import get_transport\n"
        "a, b = get_transport('ucx'), get_transport('ucx')\n"
        "for t in (a, b): t.register(*make_kv_caches('vllm', num_layers=2, num_blocks=8, block_size=4,"
        " num_kv_heads=2, head_size=8, dtype='bf16', fill='zeros'))\n"
        "p = b.connect(a.address); b.read(p, plan_segments(a.spec, b.spec, [1], [2]), 'x').wait(10)\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.monotonic(); time.sleep(3)\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF)\n"
        "cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)\n"
        "print('IDLE', cpu, time.monotonic() - t0, flush=True); a.close(); b.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("IDLE")]
    assert line, out.stderr[-2000:]
    cpu, wall = map(float, line[0].split()[1:])
    assert cpu < 0.2 * wall, f"idle process used {cpu:.2f} s of CPU in {wall:.2f} s"


_PROGRESS_AFFINITY = """
import threading, time
import torch
from p2pkv.layout import make_kv_caches
from p2pkv.transport import get_transport
t, s = make_kv_caches("vllm", num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_size=8, dtype=torch.float16)
before = set(os.listdir("/proc/self/task"))
with get_transport("ucx") as tr:
    tr.register(t, s)
    python = {str(x.native_id) for x in threading.enumerate()}
    # UCX's own "async" thread (libucs's timers and events) is not one p2pkv starts
    native = [d for d in set(os.listdir("/proc/self/task")) - before - python
              if open(f"/proc/self/task/{d}/comm").read().strip() != "async"]
    end = time.monotonic() + 10  # ucxx's progress thread runs its start callback soon after it starts
    while True:
        got = sorted({tuple(sorted(os.sched_getaffinity(int(d)))) for d in native})
        if len(got) == 1 and len(got[0]) > 1 or time.monotonic() > end:
            break
        time.sleep(0.05)
    print([len(native), got])
"""


@needs_ucxx
@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_ucxx_progress_thread_leaves_the_core_the_engine_pinned():
    """The transport is made on the engine's thread, pinned to one core; ucxx's progress thread, which
    completes the transfers, and p2pkv's native threads take every CPU instead (P2PKV_IO_CPUS unset)."""
    count, got = run_pinned(_PROGRESS_AFFINITY, timeout=100)
    assert count >= 2 and got == [tuple(sorted(os.sched_getaffinity(0)))], (count, got)


@needs_ucxx
@pytest.mark.timeout(30)
def test_describe_says_which_path_is_used():
    from p2pkv.transport.ucx import describe
    d = describe()
    assert "cma" in d["host_memory"] and "cuda_ipc" in d["cuda_memory"] and "GET" in d["data_path"]
    assert d["ucx"].count(".") == 2 and isinstance(d["transports"], list)
    json.dumps(d)


@pytest.mark.timeout(60)
def test_without_ucxx_the_backend_says_how_to_install_and_others_still_work():
    code = (
        "import sys\n"
        "sys.modules['ucxx'] = None\n"
        "import p2pkv\n"
        "from p2pkv.transport import BackendUnavailable, get_transport\n"
        "try:\n"
        "    get_transport('ucx')\n"
        "except BackendUnavailable as e:\n"
        "    print('UNAVAILABLE', e)\n"
        "with get_transport('tcp') as t:\n"
        "    print('TCP OK', t.address)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert "UNAVAILABLE" in out.stdout and "pip install 'p2pkv[ucx]'" in out.stdout, out.stdout + out.stderr
    assert "p2pkv[ucx-cu13]" in out.stdout and "TCP OK" in out.stdout
