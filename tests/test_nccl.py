"""nccl backend across real processes on loopback, through gloo on CPU tensors:
byte-exact reads and writes for every layout (views, packed chunks and both mixed),
standalone and under torch.distributed.run, several D processes in turn and at once,
and D processes that vanish or stall. The NCCL (CUDA) tests need a GPU (two ranks share one
where there is only one)."""
from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvcheck import assert_same, expected_after
from p2pkv import kernels
from p2pkv.layout import PRESETS, make_kv_caches, plan_segments
from p2pkv.transport import PeerClosedError, TransferError, get_transport
from p2pkv.transport.chunks import Packer, plan_chunks
from peer import build
from procs import peer_process, run_pinned, stop_process

HERE = Path(__file__).resolve().parent
ROLES = str(HERE / "nccl_roles.py")

# Spans of 512 B and more take the numpy unit path when packed; the default shape of
# tests/peer.py (128 B spans) takes the per-segment fallback.
SHAPES = [{"head_size": 64}, {}]
MODES = {
    "default": {},
    "views": {"pack_threshold": 0},
    "packed": {"pack_threshold": 1 << 40, "chunk_bytes": 4096, "depth": 2},
    "mixed": {"pack_threshold": 1024, "chunk_bytes": 8192, "depth": 3},
    # three gloo sockets and unpacking threads; a 5-chunk window is cut to 3 slots, re-posted
    "sockets": {"pack_threshold": 1 << 40, "chunk_bytes": 4096, "sockets": 3, "recv_window_bytes": 5 * 4096},
    "one socket": {"sockets": 1, "pack_threshold": 2048, "chunk_bytes": 4096, "hugepages": False},
}


def _d_proc(addr: str, cfg: dict, opts: dict, reads: int, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, ROLES, "d", addr, json.dumps(cfg), json.dumps(opts), str(reads), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_plan_chunks_covers_every_segment_once_in_order():
    rng = np.random.default_rng(3)
    length = rng.integers(1, 5000, 300)
    direct, packed, bounds = plan_chunks(length, 3000, 8192)
    assert sorted(np.concatenate([direct, packed]).tolist()) == list(range(300))
    assert np.all(length[direct] >= 3000) and np.all(length[packed] < 3000)
    assert np.all(np.diff(packed) > 0) and bounds[0] == 0 and bounds[-1] == len(packed)
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert b > a and (b - a == 1 or length[packed[a:b]].sum() <= 8192)
    assert plan_chunks(length, 0, 8192)[1].size == 0
    assert len(plan_chunks(np.array([100_000]), 1 << 40, 4096)[2]) == 2


def _greedy_bounds(length: np.ndarray, chunk_bytes: int) -> list[int]:
    bounds, size = [0], 0
    for i, n in enumerate(length.tolist()):
        if i > bounds[-1] and size + n > chunk_bytes:
            bounds.append(i)
            size = 0
        size += n
    return bounds + [len(length)]


@pytest.mark.parametrize("seg,chunk", [(32768, 2 << 20), (3000, 8192), (5000, 4096), (4096, 4096), (7, 100)])
def test_plan_chunks_of_equal_segments_cuts_as_the_greedy_plan(seg, chunk):
    for n in (1, 2, 63, 64, 65, 1000):
        length = np.full(n, seg)
        direct, packed, bounds = plan_chunks(length, 1 << 40, chunk)
        assert direct.size == 0 and packed.tolist() == list(range(n))
        assert bounds.tolist() == _greedy_bounds(length, chunk)
        mixed = length.copy()
        mixed[-1] -= 1
        assert plan_chunks(mixed, 1 << 40, chunk)[2].tolist() == _greedy_bounds(mixed, chunk)


def _native_plan(region, off, length, threshold, chunk, sizes=(1 << 30, 1 << 30), rid="cut", is_write=False):
    from p2pkv import _c10d
    from p2pkv.transport import native as nat
    table = np.stack([region, off, length], axis=1).astype("<i8").tobytes()
    body = nat.request_body(nat.FORM_TABLE, rid, table, len(length))
    return _c10d.plan(body, is_write, np.asarray(sizes, "<u8").tobytes(), threshold, chunk)


@pytest.mark.parametrize("threshold,chunk", [(1 << 40, 4096), (1024, 8192), (0, 4096), (3000, 8192), (1 << 40, 2 << 20)])
def test_native_path_cuts_the_messages_plan_chunks_cuts(threshold, chunk):
    """The native data path (both sides, csrc/c10d) cuts a request's unmerged rows exactly as plan_chunks does."""
    rng = np.random.default_rng(chunk + threshold % 1000)
    for n, equal in ((1, False), (300, False), (257, True)):
        length = np.full(n, 4096) if equal else rng.integers(1, 5000, n)
        region, off = rng.integers(0, 2, n), rng.integers(0, 1 << 20, n)
        rid, total, direct, packed, bounds, sizes = _native_plan(region, off, length, threshold, chunk)
        d, p, b = plan_chunks(length, threshold, chunk)
        assert (rid, total) == ("cut", int(length.sum()))
        assert direct == d.tolist() and packed == p.tolist() and (bounds or [0]) == b.tolist()
        assert sizes == [int(length[p[x:y]].sum()) for x, y in itertools.pairwise(b)]


def test_native_path_refuses_what_the_serving_side_must_not_touch():
    one = np.array([1])
    for (region, off, length, is_write), says in [
        ((one, one * 100, one * 64, False), "runs past the end of region 1"),
        ((one * 2, one * 0, one * 8, False), "only 2 are registered"),
        ((one, one * -1, one * 8, False), "negative offset"),
        ((one, one * 0, one * 0, False), "non-positive length"),
    ]:
        with pytest.raises(ValueError, match=says):
            _native_plan(region, off, length, 0, 4096, sizes=(128, 128), is_write=is_write)
    from p2pkv import _c10d
    from p2pkv.transport import native as nat
    blocks = nat.request_body(nat.FORM_BLOCKS, "b", np.arange(3, dtype="<i8").tobytes(), 3)
    with pytest.raises(ValueError, match="segment tables, not block ids"):
        _c10d.plan(blocks, False, np.asarray([128], "<u8").tobytes(), 0, 4096)
    good = nat.request_body(nat.FORM_TABLE, "t", np.array([[0, 0, 8]], "<i8").tobytes(), 1)
    with pytest.raises(ValueError, match="add up to"):
        _c10d.plan(good[:-1], False, np.asarray([128], "<u8").tobytes(), 0, 4096)


def test_native_request_parser_survives_any_bytes():
    """Fuzz: truncated, bit-flipped and random bodies are refused with a reason or cut within the regions."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from p2pkv import _c10d
    from p2pkv.transport import native as nat
    sizes = np.asarray([4096, 4096], "<u8").tobytes()
    seed = nat.request_body(nat.FORM_TABLE, "f", np.array([[0, 0, 8], [1, 4000, 96]], "<i8").tobytes(), 2)

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(st.binary(max_size=160),
                     st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)).map(
                         lambda f: seed[:f[0]] + bytes([f[1]]) + seed[f[0] + 1:]),
                     st.integers(0, len(seed)).map(lambda k: seed[:k])),
           st.booleans())
    def check(body, is_write):
        try:
            _, total, direct, packed, _, _ = _c10d.plan(body, is_write, sizes, 64, 4096)
        except ValueError:
            return
        assert total <= 2 * 4096 and len(direct) + len(packed) <= 2 * 4096
    check()


_CUDA_PACK = torch.cuda.is_available() and kernels.load() is not None


@pytest.mark.parametrize("threads,device", [(1, "cpu"), (2, "cpu"),
                                            pytest.param(1, "cuda", marks=pytest.mark.skipif(
                                                not _CUDA_PACK, reason="needs a CUDA device and the built extension"))])
def test_packed_chunks_carry_exactly_the_segments_bytes(threads, device):
    """With one torch thread chunks are packed by index_select, otherwise by numpy's take, on CUDA by
    p2pkv.kernels (NCCL's path): the same bytes every way."""
    rng = np.random.default_rng(threads)
    unit = 512
    src = [torch.from_numpy(rng.integers(0, 256, 64 * unit, dtype=np.uint8)).to(device) for _ in range(2)]
    dst = [torch.zeros(128 * unit, dtype=torch.uint8, device=device) for _ in range(2)]
    n = 40
    length = rng.integers(1, 4, n) * unit
    region = rng.integers(0, 2, n).astype(np.int32)
    off = rng.integers(0, 60, n) * unit
    out_off = np.concatenate([[0], np.cumsum(length)[:-1]])
    packed = np.arange(n)
    bounds = plan_chunks(length, 1 << 40, 4 * unit)[2]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sender = Packer(src, region, off, length, packed, bounds)
        receiver = Packer(dst, region, out_off, length, packed, bounds)
        assert sender.g == (unit if device == "cpu" else 0)
        buf = torch.empty(max(sender.sizes), dtype=torch.uint8, device=device)
        for j in range(len(sender)):
            receiver.scatter(j, buf[:sender.gather(j, buf)])
    finally:
        torch.set_num_threads(saved)
    expect = [torch.zeros_like(d) for d in dst]
    for r, o, d, k in zip(region.tolist(), off.tolist(), out_off.tolist(), length.tolist()):
        expect[r][d:d + k] = src[r][o:o + k]
    for got, want in zip(dst, expect):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [{"pack_threshold": -1}, {"chunk_bytes": 10}, {"depth": 0}, {"depth": 65},
                                 {"sockets": 0}, {"sockets": 17}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_transport("nccl", **bad)


def test_without_its_native_data_path_nccl_says_how_to_build_it(monkeypatch):
    from p2pkv.transport import BackendUnavailable, nccl
    monkeypatch.setattr(nccl, "_c10d", None)
    monkeypatch.setattr(nccl, "_C10D_MISSING", "No module named 'p2pkv._c10d'")
    with pytest.raises(BackendUnavailable, match="p2pkv._c10d.*--no-build-isolation"):
        get_transport("nccl")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(MODES))
def test_read_every_layout_is_byte_exact(mode):
    opts = MODES[mode]
    configs = [{"layout": lay, "seed": i, **shape} for i, (lay, shape) in
               enumerate((lay, sh) for lay in PRESETS for sh in SHAPES)]
    rng = np.random.default_rng(len(mode))
    with peer_process("nccl", configs, opts) as p:
        for cfg, addr in zip(configs, p.addresses):
            d_tensors, d_spec = build({**cfg, "seed": 777})
            p_tensors, _ = build(cfg)
            with get_transport("nccl", timeout=20, **opts) as tr:
                tr.register(d_tensors, d_spec)
                peer = tr.connect(addr)
                for r in range(2):
                    before = [t.clone() for t in d_tensors]
                    n = int(rng.integers(1, 20))
                    src, dst = rng.choice(24, n, replace=False), rng.choice(24, n, replace=False)
                    tr.read(peer, plan_segments(peer.spec, d_spec, src, dst), request_id=f"{cfg}-{r}").wait(20)
                    assert_same(d_tensors, expected_after(cfg["layout"], before, p_tensors, src, dst))


def _request_path_threads(names: list[str]) -> list[str]:
    """p2pkv's Python threads other than the per-peer set-up ones (accepting connections, freeing groups)."""
    return [n for n in names if n.startswith("p2pkv") and not n.startswith(("p2pkv-nccl-accept", "p2pkv-nccl-free"))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["default", "packed", "mixed"])
def test_read_completes_while_ps_engine_thread_spins(mode):
    """P's process has a pure-Python thread spinning, as a busy engine's: reads still land byte-exact,
    and neither side ran a p2pkv Python thread for them (the native data path serves and completes
    them; only the accept loops, set-up threads, are Python)."""
    cfg = {"layout": "vllm_cpu", "seed": 21, "head_size": 64, "blocks": 32}
    opts = {"timeout": 20, **MODES[mode]}
    proc = subprocess.Popen([sys.executable, ROLES, "busy-p", json.dumps(cfg), json.dumps(opts)], cwd=HERE,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ADDR "), proc.stderr.read()[-2000:]
        d_tensors, d_spec = build({**cfg, "seed": 71})
        p_tensors, _ = build(cfg)
        rng = np.random.default_rng(5)
        with get_transport("nccl", **opts) as tr:
            tr.register(d_tensors, d_spec)
            peer = tr.connect(line.split()[1])
            for r in range(3):
                before = [t.clone() for t in d_tensors]
                n = int(rng.integers(1, 32))
                src, dst = rng.choice(32, n, replace=False), rng.choice(32, n, replace=False)
                h = tr.read(peer, plan_segments(peer.spec, d_spec, src, dst), f"busy-{r}")
                h.wait(20)
                assert h.done() and h.error is None
                assert_same(d_tensors, expected_after(cfg["layout"], before, p_tensors, src, dst))
            mine = [t.name for t in threading.enumerate()]
            assert not _request_path_threads(mine), mine
        proc.stdin.write("threads\n")
        proc.stdin.flush()
        theirs = json.loads(proc.stdout.readline().split(" ", 1)[1])
        assert not _request_path_threads(theirs), theirs
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_HELPERS_AFFINITY = """
import threading
from p2pkv.layout import plan_segments
from p2pkv.transport import get_transport
from p2pkv.transport.nccl import NcclTransport
from peer import build
cpus = {}
run = threading.Thread.run
def run_and_note(self):  # what the thread itself ends with
    try:
        run(self)
    finally:
        cpus[self.name] = sorted(os.sched_getaffinity(0))
threading.Thread.run = run_and_note
NcclTransport._native = lambda self, conn: False  # the Python data path, as for CUDA tensors or over TLS
cfg = {"layout": "vllm_cpu", "seed": 1, "head_size": 64, "blocks": 8}
(pt, ps), (dt, ds) = build(cfg), build({**cfg, "seed": 2})
opts = {"timeout": 20, "pack_threshold": 1 << 40, "chunk_bytes": 4096, "depth": 2, "sockets": 2}
with get_transport("nccl", **opts) as p, get_transport("nccl", **opts) as d:
    p.register(pt, ps)
    d.register(dt, ds)
    peer = d.connect(p.address)
    d.read(peer, plan_segments(peer.spec, ds, [0, 1, 2, 3], [4, 5, 6, 7]), "r").wait(20)
for t in threading.enumerate():
    if t.name.startswith("p2pkv-nccl-free"):  # the reaper lives on: read it from here
        cpus["p2pkv-nccl-free"] = sorted(os.sched_getaffinity(t.native_id))
print({name: c for name, c in cpus.items() if name.startswith("p2pkv-nccl")})
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_python_paths_helper_threads_leave_the_core_the_engine_pinned():
    """In a process whose engine thread is pinned to one core, the Python data path's packing and
    unpacking helpers and the thread that frees process groups (started by a close() on the engine's
    thread) all take every CPU (P2PKV_IO_CPUS unset)."""
    got = run_pinned(_HELPERS_AFFINITY, timeout=100)  # two transports and a transfer, most threads on one core
    assert {"p2pkv-nccl-send", "p2pkv-nccl-unpack", "p2pkv-nccl-free"} <= set(got), got
    assert all(c == sorted(os.sched_getaffinity(0)) for c in got.values()), got


@pytest.mark.timeout(60)
def test_the_accepting_sides_settings_cut_the_messages():
    cfg = {"layout": "vllm_cpu", "seed": 6, "head_size": 64}
    with peer_process("nccl", [cfg], {"pack_threshold": 0}) as p:
        d_tensors, d_spec = build({**cfg, "seed": 31})
        before = [t.clone() for t in d_tensors]
        p_tensors, _ = build(cfg)
        with get_transport("nccl", timeout=20, pack_threshold=1 << 40, chunk_bytes=4096, depth=1, sockets=5) as tr:
            tr.register(d_tensors, d_spec)
            peer = tr.connect(p.addresses[0])
            src, dst = [0, 5, 6, 7, 23], [1, 2, 3, 12, 8]
            tr.read(peer, plan_segments(peer.spec, d_spec, src, dst), "mixed-settings").wait(20)
    assert_same(d_tensors, expected_after(cfg["layout"], before, p_tensors, src, dst))


@pytest.mark.timeout(60)
def test_write_lands_in_exactly_the_destination_blocks(tmp_path):
    cfg = {"layout": "block_first", "seed": 5, "head_size": 64}
    with peer_process("nccl", [cfg]) as p:
        mine, spec = build({**cfg, "seed": 99})
        theirs_before, _ = build(cfg)
        with get_transport("nccl", timeout=20) as tr:
            tr.register(mine, spec)
            peer = tr.connect(p.addresses[0])
            src, dst = [3, 4, 5, 17, 0], [20, 2, 9, 10, 11]
            tr.write(peer, plan_segments(spec, peer.spec, src, dst), "w1", notify={"done": "w1"}).wait(20)
            tr.baseline(peer, 1 << 16, 2)
            raw = p.dump(0, tmp_path / "p.bin")
    expect = expected_after(cfg["layout"], theirs_before, mine, src, dst)
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.uint8), torch.cat([e.reshape(-1) for e in expect]))


@pytest.mark.timeout(120)
def test_under_torchrun_every_layout(tmp_path):
    configs = [{"layout": lay, "seed": i, "head_size": 64} for i, lay in enumerate(PRESETS)]
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), ROLES, "torchrun", str(out),
                             json.dumps(configs)], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    assert json.loads(out.read_text()) == {lay: "ok" for lay in PRESETS}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_p_serves_two_d_in_turn_and_at_once():
    cfg = {"layout": "vllm", "seed": 7, "head_size": 64, "blocks": 48}
    opts = {"timeout": 20, "pack_threshold": 2048, "chunk_bytes": 16384, "depth": 2}
    with peer_process("nccl", [cfg], opts) as p:
        addr = p.addresses[0]
        for seed in (1, 2):
            [(rc, out, err)] = _finish([_d_proc(addr, cfg, opts, 3, seed)], 60)
            assert rc == 0 and out.strip() == "OK 3", err[-2000:]
        results = _finish([_d_proc(addr, cfg, opts, 5, seed) for seed in (3, 4)], 80)
        for rc, out, err in results:
            assert rc == 0 and out.strip() == "OK 5", err[-2000:]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["quit", "kill"])
def test_d_that_exits_before_its_transfer_fails_only_its_own(tmp_path, how):
    cfg = {"layout": "vllm", "seed": 11, "head_size": 64}
    timeout = 8.0
    with peer_process("nccl", [cfg]) as d1, peer_process("nccl", [cfg]) as d2:
        mine, spec = build({**cfg, "seed": 42})
        with get_transport("nccl", timeout=timeout) as tr:
            tr.register(mine, spec)
            p1, p2 = tr.connect(d1.addresses[0]), tr.connect(d2.addresses[0])
            if how == "quit":
                d1.proc.stdin.write("quit\n")
                d1.proc.stdin.flush()
            else:
                d1.proc.send_signal(signal.SIGKILL)
            d1.proc.wait(timeout=20)
            segs = plan_segments(spec, p1.spec, [1, 2, 3, 9], [4, 5, 6, 7])
            t0 = time.monotonic()
            with pytest.raises(TransferError) as err:
                tr.write(p1, segs, "to-gone-d").wait(timeout * 3)
            assert time.monotonic() - t0 < timeout * 2
            assert "to-gone-d" in str(err.value) and p1.name in str(err.value)
            before, _ = build(cfg)
            for r in range(2):
                tr.write(p2, segs, f"to-live-d-{r}").wait(timeout)
            raw = d2.dump(0, tmp_path / "d2.bin")
    expect = expected_after(cfg["layout"], before, mine, [1, 2, 3, 9], [4, 5, 6, 7])
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.uint8), torch.cat([e.reshape(-1) for e in expect]))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_d_mid_stream_leaves_p_serving_others():
    cfg = {"layout": "cross_layer", "seed": 3, "head_size": 64, "blocks": 64}
    opts = {"timeout": 10}
    with peer_process("nccl", [cfg], opts) as p:
        addr = p.addresses[0]
        doomed = _d_proc(addr, cfg, opts, 10_000, 9)
        try:
            time.sleep(2.0)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=10)
        finally:
            if doomed.poll() is None:
                doomed.kill()
            doomed.wait()
        [(rc, out, err)] = _finish([_d_proc(addr, cfg, opts, 3, 10)], 60)
        assert rc == 0 and out.strip() == "OK 3", err[-2000:]


@pytest.mark.timeout(60)
def test_stalled_d_turns_into_an_error_within_the_timeout():
    cfg = {"layout": "mla", "seed": 2, "head_size": 64}
    with peer_process("nccl", [cfg]) as d:
        mine, spec = build({**cfg, "seed": 8})
        with get_transport("nccl", timeout=3) as tr:
            tr.register(mine, spec)
            peer = tr.connect(d.addresses[0])
            stop_process(d.proc.pid)
            try:
                t0 = time.monotonic()
                with pytest.raises(TransferError, match="stalled-req"):
                    tr.write(peer, plan_segments(spec, peer.spec, list(range(20)), list(range(20))),
                             "stalled-req").wait(30)
                assert time.monotonic() - t0 < 12
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)


@pytest.mark.timeout(30)
def test_connect_to_nothing_is_a_clear_error():
    tensors, spec = make_kv_caches("mla", num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_size=8)
    with get_transport("nccl", timeout=2) as tr:
        tr.register(tensors, spec)
        with get_transport("nccl", timeout=2) as other:
            other.register(tensors, spec)
            dead = other.address
        with pytest.raises(PeerClosedError, match=dead.split(":")[-1]):
            tr.connect(dead)


# ------------------------------------------------------------------------------- NCCL on CUDA tensors

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_nccl = pytest.mark.skipif(_GPUS < 1 or not hasattr(torch.distributed, "ProcessGroupNCCL"),
                                reason=f"NCCL tests need a CUDA device and a torch build with NCCL; this machine "
                                       f"has {_GPUS} CUDA devices")
# Runs of 4, 2 and 3 blocks that follow each other on both sides, and single blocks: with a 64 KiB
# threshold the runs (128/64/96 KiB) travel as views and the singles (32 KiB) packed.
CUDA_SRC = [0, 1, 2, 3, 8, 12, 13, 20, 30, 31, 32, 40, 41, 63]
CUDA_DST = [1, 2, 3, 4, 9, 14, 15, 22, 33, 34, 35, 50, 60, 0]
CUDA_BACK = [44, 45, 46, 47, 49]  # D writes its first five landed blocks back into these P blocks
CUDA_MODES = {"packed": {}, "views": {"pack_threshold": 0}, "mixed": {"pack_threshold": 64 << 10, "chunk_bytes": 64 << 10}}


def _one_gpu_env(role: str) -> dict[str, str]:
    """With one GPU both ranks share it. NCCL refuses two ranks of one host on one device, so each
    process names its own host (NCCL_HOSTID) and the pair talks over NCCL's socket transport on
    loopback: a test of p2pkv's NCCL path and its bytes, not of NVLink speed."""
    if _GPUS >= 2:
        return {}
    return {"NCCL_HOSTID": f"p2pkv-test-{role}", "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1"}


def _cuda_d(addr: str, q_path: str) -> None:  # pragma: no cover - runs only with a GPU
    os.environ.update(_one_gpu_env("d"))
    dev = 1 if _GPUS >= 2 else 0
    torch.cuda.set_device(dev)
    tensors, spec = make_kv_caches("vllm", num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8,
                                   head_size=128, device=f"cuda:{dev}", fill="zeros")
    with get_transport("nccl", timeout=60) as tr:
        tr.register(tensors, spec)
        peer = tr.connect(addr)
        tr.read(peer, plan_segments(peer.spec, spec, CUDA_SRC, CUDA_DST), "cuda-read").wait(60)
        torch.cuda.synchronize()
        Path(q_path).write_bytes(b"".join(t.cpu().view(torch.uint8).numpy().tobytes() for t in tensors))
        tr.write(peer, plan_segments(spec, peer.spec, CUDA_DST[:5], CUDA_BACK), "cuda-write").wait(60)


@needs_nccl
@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", list(CUDA_MODES))
def test_nccl_on_cuda_is_byte_exact(tmp_path, monkeypatch, mode):  # pragma: no cover - runs only with a GPU
    """P on cuda:0, D on cuda:1 (or cuda:0 too, see `_one_gpu_env`); D reads, then writes some blocks
    back; the accepting P's settings pick packed chunks, views (posted as one NCCL group) or both."""
    import multiprocessing as mp
    for k, v in _one_gpu_env("p").items():
        monkeypatch.setenv(k, v)
    g = torch.Generator().manual_seed(4)
    p_tensors, spec = make_kv_caches("vllm", num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8,
                                     head_size=128, device="cuda:0", fill="random", generator=g)
    before = [t.cpu() for t in p_tensors]
    with get_transport("nccl", timeout=60, **CUDA_MODES[mode]) as tr:
        tr.register(p_tensors, spec)
        out = tmp_path / "d.bin"
        proc = mp.get_context("spawn").Process(target=_cuda_d, args=(tr.address, str(out)))
        proc.start()
        try:
            proc.join(150)
            assert proc.exitcode == 0
        finally:
            if proc.is_alive():
                proc.kill()
        torch.cuda.synchronize()
        after = [t.cpu() for t in p_tensors]
    got = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.uint8)
    zeros = [torch.zeros_like(t) for t in before]
    expect = expected_after("vllm", zeros, before, CUDA_SRC, CUDA_DST)
    assert torch.equal(got, torch.cat([e.reshape(-1) for e in expect]))
    # D's write put P's blocks CUDA_SRC[:5] (as D had received them) into CUDA_BACK, nothing else
    assert_same(after, expected_after("vllm", before, before, CUDA_SRC[:5], CUDA_BACK))


@pytest.mark.skipif(_GPUS != 1, reason=f"checks the message on a machine with exactly one GPU; this one has {_GPUS}")
@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_bench_on_one_gpu_says_nccl_needs_two():  # pragma: no cover - runs only with one GPU
    r = subprocess.run([sys.executable, "-m", "p2pkv", "bench", "--backend", "nccl", "--device", "cuda"],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode != 0 and "needs two GPUs" in r.stderr and "cuda_ipc" in r.stderr
