"""p2pkv.connector: pull and push, whole-request and per-layer, hold release on
confirmation and on timeout, and exact failed-block reports (peer gone, checksum),
in one process over `loopback` and across real processes over `tcp`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import weakref

import pytest
import torch

from p2pkv.connector import Finished, KVConnector
from p2pkv.layout import make_kv_caches, plan_segments

SHAPE = dict(num_layers=3, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")


def caches(layout: str, num_blocks: int, fill: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return make_kv_caches(layout, num_blocks=num_blocks, fill=fill, generator=g, **SHAPE)


def block_bytes(tensors, spec, block: int) -> list[bytes]:
    """The logical bytes of one block in every layer (span order), comparable across layouts."""
    from p2pkv.transport.base import byte_regions
    out = []
    for reg, flat in zip(spec.regions, byte_regions(tensors, spec)):
        out.append(b"".join(flat[block * reg.block_stride + o:block * reg.block_stride + o + n].numpy().tobytes()
                            for o, n in reg.spans))
    return out


SEEN: "weakref.WeakKeyDictionary[KVConnector, Finished]" = weakref.WeakKeyDictionary()


def step(*conns: KVConnector) -> None:
    """One engine step on each side: get_finished() is what moves a connector's requests along."""
    for c in conns:
        f = c.get_finished()
        acc = SEEN.setdefault(c, Finished())
        acc.saved |= f.saved
        acc.loaded |= f.loaded
        acc.failed.update(f.failed)


def reported(conn: KVConnector) -> Finished:
    """What `conn` reported since the last wait on it (steps of other waits included)."""
    step(conn)
    return SEEN.pop(conn, Finished())


def wait_finished(conn: KVConnector, key: str, what: str = "loaded", timeout: float = 20.0,
                  also: tuple[KVConnector, ...] = ()) -> Finished:
    """Step `conn` and the peers in `also` as their engines would, until `conn` reports `key` as `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        step(conn, *also)
        if key in getattr(SEEN[conn], what):
            return SEEN.pop(conn)
        time.sleep(0.002)
    raise AssertionError(f"{key!r} not {what} within {timeout} s")


def until(cond, *conns: KVConnector, timeout: float = 10.0) -> None:
    """Step the connectors until `cond()` holds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"condition not met within {timeout} s"
        step(*conns)
        time.sleep(0.002)


def pair(mode: str, p_layout: str = "vllm", d_layout: str = "vllm", **kw):
    pt, pspec = caches(p_layout, 16, "random", seed=1)
    dt, dspec = caches(d_layout, 12, "zeros")
    p = KVConnector("loopback", mode=mode, **kw)
    d = KVConnector("loopback", mode=mode, **kw)
    p.register_kv_caches(pt, pspec)
    d.register_kv_caches(dt, dspec)
    return p, d, (pt, pspec), (dt, dspec)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("layouts", [("vllm", "vllm"), ("vllm_cpu", "vllm_cpu"), ("vllm", "block_first")])
def test_pull_moves_exact_blocks_and_releases_on_confirm(layouts):
    p, d, (pt, pspec), (dt, dspec) = pair("pull", *layouts)
    try:
        src, dst = [7, 3, 9, 10], [2, 5, 6, 0]
        p.save("req-1", src)
        params = p.transfer_params("req-1")
        assert params["remote_block_ids"] == src and params["remote_address"] == p.address
        d.load("req-1", dst, peer=params["remote_address"], remote_block_ids=params["remote_block_ids"])
        f = wait_finished(d, "req-1", also=(p,))
        assert not f.failed
        for s, t in zip(src, dst):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        untouched = [b for b in range(12) if b not in dst]
        assert all(set(x) == {0} for b in untouched for x in block_bytes(dt, dspec, b))
        wait_finished(p, "req-1", "saved", also=(d,))
        assert p.metrics["released_confirmed"] == 1 and p.holding() == {}
        assert d.metrics["loaded_blocks"] == 4
        ps, ds = p.stats(), d.stats()
        nbytes = 4 * pspec.bytes_per_block
        assert ps.counts["sent_blocks"] == 4 and ps.counts["sent_bytes"] == nbytes and ps.held == 0
        assert ps.holds_ended == {"confirmed": 1} and ps.counts["saved_requests"] == 1
        assert ds.counts["loaded_blocks"] == 4 and ds.counts["loaded_bytes"] == nbytes and not ds.load_failures
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_push_layer_by_layer_lands_each_layer_before_the_next_is_saved():
    p, d, (pt, pspec), (dt, dspec) = pair("push", checksum=True)
    try:
        src, dst = [1, 2, 3, 8], [4, 5, 6, 7]
        d.load("req-2", dst, peer=p.address)
        for layer in range(3):
            p.save("req-2", src, layer=layer)
            until(lambda: d.wait_layer("req-2", layer, timeout=0.01), p)
            assert layer == 2 or not d.wait_layer("req-2", layer + 1, timeout=0)
        f = wait_finished(d, "req-2", also=(p,))
        assert not f.failed
        for s, t in zip(src, dst):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        wait_finished(p, "req-2", "saved", also=(d,))
        assert p.metrics["released_confirmed"] == 1 and p.metrics["sent_bytes"] > 0
        assert p.stats().counts["sent_blocks"] == 4 and d.stats().counts["loaded_blocks"] == 4
        assert d.stats().counts["loaded_bytes"] == p.stats().counts["sent_bytes"] == 4 * pspec.bytes_per_block
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_push_with_offset_skips_blocks_d_already_has():
    p, d, (pt, pspec), (dt, dspec) = pair("push")
    try:
        p.save("r", [9, 10, 11])
        d.load("r", [3, 4], peer=p.address, remote_offset=1)
        assert not wait_finished(d, "r", also=(p,)).failed
        assert block_bytes(pt, pspec, 10) == block_bytes(dt, dspec, 3)
        assert block_bytes(pt, pspec, 11) == block_bytes(dt, dspec, 4)
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_producer_releases_after_hold_timeout_when_nobody_comes():
    p, d, *_ = pair("pull", hold_timeout=0.2)
    try:
        p.save("lonely", [1, 2])
        assert p.holding() == {"lonely": [1, 2]}
        wait_finished(p, "lonely", "saved", timeout=5, also=(d,))
        assert p.metrics["released_timeout"] == 1 and p.metrics["released_confirmed"] == 0
        assert p.holding() == {}
        assert p.stats().holds_ended == {"expired": 1} and p.stats().held == 0
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("checksum", [False, True])
def test_pull_load_after_the_hold_expired_fails_instead_of_reading_reused_blocks(checksum):
    """P freed the blocks (D came after hold_timeout) and its engine wrote another request's KV
    there: D's read gets those bytes, so the load must fail and name every block to recompute."""
    p, d, (pt, _), (dt, _) = pair("pull", hold_timeout=0.2, checksum=checksum)
    try:
        p.save("late", [7, 3])
        wait_finished(p, "late", "saved", timeout=5, also=(d,))
        assert p.metrics["released_timeout"] == 1
        for t in pt:
            t.fill_(1.5)
        d.load("d-late", [2, 5], peer=p.address, remote_request_id="late", remote_block_ids=[7, 3])
        f = wait_finished(d, "d-late", also=(p,))
        assert set(f.failed["d-late"].blocks) == {2, 5} and "released these blocks" in f.failed["d-late"].reason
        assert f.failed["d-late"].cause == "gone"
        p.save("fresh", [4])
        d.load("d-fresh", [6], peer=p.address, remote_request_id="fresh", remote_block_ids=[4])
        assert not wait_finished(d, "d-fresh", also=(p,)).failed
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_load_from_gone_peer_reports_every_block():
    p, d, *_ = pair("pull")
    addr = p.address
    p.close()
    try:
        d.load("x", [4, 1, 2], peer=addr, remote_block_ids=[0, 1, 2])
        f = wait_finished(d, "x")
        assert f.failed["x"].blocks == (4, 1, 2)
        assert addr in f.failed["x"].reason and "'x'" in f.failed["x"].reason
        assert d.metrics["failed_blocks"] == 3
        assert f.failed["x"].cause == "unreachable" and d.stats().load_failures == {"unreachable": 1}
    finally:
        d.close()


@pytest.mark.timeout(30)
def test_push_load_times_out_when_producer_never_saves():
    p, d, *_ = pair("push", load_timeout=0.3)
    try:
        d.load("never", [1, 2], peer=p.address)
        f = wait_finished(d, "never", timeout=5, also=(p,))
        assert f.failed["never"].blocks == (1, 2) and "timeout" in f.failed["never"].reason
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_checksum_mismatch_names_exactly_the_corrupted_block():
    p, d, (pt, pspec), (dt, dspec) = pair("pull", checksum=True)
    real_read = d.transport.read

    def corrupting_read(peer, segments, request_id=None):
        h = real_read(peer, segments, request_id)
        h.wait(5)
        if 1 in segments.region:
            reg = dspec.regions[1]
            d.transport.regions[1][5 * reg.block_stride + reg.spans[0][0]] ^= 0xFF
        return h
    d.transport.read = corrupting_read
    try:
        p.save("c", [1, 2, 3])
        d.load("c", [4, 5, 6], peer=p.address, remote_block_ids=[1, 2, 3])
        f = wait_finished(d, "c", also=(p,))
        assert f.failed["c"].blocks == (5,) and "checksum" in f.failed["c"].reason
        assert d.metrics["checksum_mismatches"] == 1 and d.metrics["loaded_blocks"] == 2
    finally:
        p.close()
        d.close()


def test_bad_arguments_are_refused_with_a_clear_message():
    p, d, *_ = pair("pull")
    try:
        with pytest.raises(ValueError, match="remote_block_ids"):
            d.load("a", [1, 2], peer=p.address, remote_block_ids=[1])
        with pytest.raises(ValueError, match="layer 7 out of range"):
            p.save("a", [1], layer=7)
        with pytest.raises(ValueError, match="unknown mode"):
            KVConnector("loopback", mode="teleport")
    finally:
        p.close()
        d.close()


# ------------------------------------------------------------------ tcp, across real processes

PRODUCER = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
from test_connector import caches
from p2pkv.connector import KVConnector
mode, blocks, n = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3])
t, spec = caches("vllm_cpu", 16, "random", seed=7)
c = KVConnector("tcp", mode=mode, hold_timeout=30)
c.register_kv_caches(t, spec)
for key in ["tcp-req"] + [f"tcp-req-{{i}}" for i in range(2, n + 1)]:
    c.save(key, blocks)
print(json.dumps(c.transfer_params("tcp-req")), flush=True)
end = time.monotonic() + 30
while time.monotonic() < end and c.holding():
    c.get_finished()  # the engine's step: what answers D and releases holds
    time.sleep(0.002)
print(json.dumps(dict(c.metrics)), flush=True)
if len(sys.argv) > 4:
    time.sleep(60)
c.close()
"""


def start_producer(mode: str, blocks: list[int], linger: bool = False, requests: int = 1) -> subprocess.Popen:
    code = PRODUCER.format(tests=os.path.dirname(__file__))
    args = [sys.executable, "-c", code, mode, ",".join(map(str, blocks)), str(requests)]
    args += ["linger"] if linger else []
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_tcp_across_processes(mode):
    src, dst = [11, 2, 3, 4, 15], [0, 9, 3, 4, 5]
    proc = start_producer(mode, src)
    d = KVConnector("tcp", mode=mode, checksum=True)
    try:
        params = json.loads(proc.stdout.readline())
        dt, dspec = caches("vllm_cpu", 10, "zeros")
        d.register_kv_caches(dt, dspec)
        d.load("tcp-req", dst, peer=params["remote_address"], remote_block_ids=params["remote_block_ids"])
        f = wait_finished(d, "tcp-req", timeout=30)
        assert not f.failed, f.failed
        pt, pspec = caches("vllm_cpu", 16, "random", seed=7)
        for s, t in zip(src, dst):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        pm = json.loads(proc.stdout.readline())
        assert pm["released_confirmed"] == 1 and pm.get("released_timeout", 0) == 0
        assert proc.wait(30) == 0
    finally:
        d.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_tcp_producer_killed_before_load_fails_every_block():
    proc = start_producer("pull", [1, 2, 3], linger=True)
    d = KVConnector("tcp", mode="pull", load_timeout=10)
    try:
        params = json.loads(proc.stdout.readline())
        proc.kill()
        proc.wait()
        dt, dspec = caches("vllm_cpu", 10, "zeros")
        d.register_kv_caches(dt, dspec)
        d.load("tcp-req", [7, 8, 9], peer=params["remote_address"], remote_block_ids=params["remote_block_ids"])
        f = wait_finished(d, "tcp-req", timeout=20)
        assert f.failed["tcp-req"].blocks == (7, 8, 9)
        assert params["remote_address"] in f.failed["tcp-req"].reason
    finally:
        d.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(30)
def test_confirmation_that_overtakes_the_save_still_releases_the_hold():
    """A read that comes before P's engine has published the hold is refused (P serves held reads
    only, so nothing is read and D recomputes), and D's release, which overtook the save, must not
    leave the hold to time out."""
    p, d, *_ = pair("pull")
    try:
        p.save("first", [1, 2])
        d.load("early", [3, 4], peer=p.address, remote_request_id="late", remote_block_ids=[5, 6])
        failed = wait_finished(d, "early", also=(p,)).failed
        assert failed["early"].blocks == (3, 4) and "nothing was read" in failed["early"].reason
        time.sleep(0.1)
        p.save("late", [5, 6])
        wait_finished(p, "late", "saved", timeout=5, also=(d,))
        assert p.metrics["released_confirmed"] == 1 and p.holding() == {"first": [1, 2]}
        d.discard(p.address, "first")
        wait_finished(p, "first", "saved", timeout=5, also=(d,))
        assert p.metrics["released_aborted"] == 1 and not p.busy()
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_timed_out_load_is_reported_only_after_its_posted_reads_ended():
    """A read still in flight when the load times out could land later in blocks the
    engine has reused: the failure is reported only once no read can land any more."""
    import threading
    from p2pkv.transport import TransferHandle
    p, d, *_ = pair("pull", load_timeout=0.2)
    real_read = d.transport.read_held
    landed = []

    def slow_read(peer, segments, request_id=None):
        h = TransferHandle(str(peer), request_id, segments.nbytes)

        def later():
            real_read(peer, segments, request_id).wait(5)
            landed.append(time.monotonic())
            h._finish()
        threading.Timer(0.8, later).start()
        return h
    d.transport.read_held = slow_read
    try:
        p.save("slow", [1, 2])
        d.load("slow", [3, 4], peer=p.address, remote_block_ids=[1, 2])
        f = wait_finished(d, "slow", timeout=10, also=(p,))
        reported = time.monotonic()
        assert f.failed["slow"].blocks == (3, 4) and "load timeout" in f.failed["slow"].reason
        assert len(landed) == 3 and max(landed) <= reported
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_whole_request_read_when_not_layerwise():
    p, d, (pt, pspec), (dt, dspec) = pair("pull", layerwise=False)
    try:
        p.save("w", [1, 5, 9])
        d.load("w", [0, 2, 4], peer=p.address, remote_block_ids=[1, 5, 9])
        assert not wait_finished(d, "w", also=(p,)).failed and d.wait_layer("w", 2, timeout=1)
        for s, t in zip([1, 5, 9], [0, 2, 4]):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_an_open_hold_is_reported_only_once_the_producer_makes_it_final():
    """An engine that sends layers during its last prefill step must not hear "sent"
    before it has finished the request itself (it would free blocks it still uses)."""
    p, d, *_ = pair("push", hold_timeout=0.3)
    try:
        d.load("open", [1, 2], peer=p.address)
        for layer in range(3):
            p.save("open", [5, 6], layer=layer, final=False)
        assert not wait_finished(d, "open", also=(p,)).failed
        time.sleep(0.6)
        step(p, d)
        assert "open" not in reported(p).saved and p.holding() == {"open": [5, 6]}
        p.save("open", [5, 6])
        wait_finished(p, "open", "saved", timeout=5, also=(d,))
        assert p.metrics["released_confirmed"] == 1 and p.metrics["released_timeout"] == 0
    finally:
        p.close()
        d.close()


def test_a_layer_of_a_planned_request_keeps_its_block_ids_for_device_copies():
    p, d, (pt, pspec), _ = pair("pull")
    try:
        full = plan_segments(pspec, pspec, [7, 3], [2, 5])
        for layer in range(p.num_layers):
            one = p.layer_map.segments(full, layer)
            assert set(one.region.tolist()) == set(p.layers[layer])
            assert one.plan.regions == tuple(p.layers[layer]) and list(one.plan.src_blocks) == [7, 3]
    finally:
        p.close()
        d.close()


def test_bad_block_ids_offsets_and_request_ids_are_refused_up_front():
    p, d, *_ = pair("pull")
    try:
        for ids, msg in [([1.7, 2], "must be integers"), ([[1, 2]], "one-dimensional"),
                         ([1, 12], "block id 12 out of range"), ([-1, 2], "block id -1 out of range"),
                         ([3, 3], "duplicate block id 3")]:
            with pytest.raises(ValueError, match=msg):
                d.load("r", ids, peer=p.address, remote_block_ids=[1, 2])
        with pytest.raises(ValueError, match="remote block id -3"):
            d.load("r", [1], peer=p.address, remote_block_ids=[-3])
        with pytest.raises(ValueError, match="remote_offset"):
            d.load("r", [1], peer=p.address, remote_block_ids=[1], remote_offset=-1)
        with pytest.raises(TypeError, match="request id"):
            d.load(5, [1], peer=p.address, remote_block_ids=[1])
        with pytest.raises(ValueError, match="block id 16 out of range"):
            p.save("s", [1, 16])
        with pytest.raises(ValueError, match="must be integers"):
            p.save("s", [0.5])
        with pytest.raises(KeyError, match="not held"):
            p.transfer_params("never-saved")
        assert p.holding() == {} and not d.busy()
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_calls_before_register_or_after_close_are_refused():
    c = KVConnector("loopback")
    p, d, (pt, pspec), _ = pair("pull")
    try:
        with pytest.raises(RuntimeError, match="register_kv_caches"):
            c.save("a", [1])
        with pytest.raises(RuntimeError, match="register_kv_caches"):
            c.load("a", [1], peer=p.address, remote_block_ids=[1])
        with pytest.raises(RuntimeError, match="already registered"):
            p.register_kv_caches(pt, pspec)
        d.close()
        d.close()
        with pytest.raises(RuntimeError, match="connector is closed"):
            d.load("a", [1], peer=p.address, remote_block_ids=[1])
        p.close()
        with pytest.raises(RuntimeError, match="connector is closed"):
            p.save("a", [1])
    finally:
        c.close()
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_push_load_of_more_blocks_than_the_producer_holds_names_the_missing_ones():
    p, d, *_ = pair("push")
    try:
        p.save("m", [1, 2])
        d.load("m", [5, 6, 7], peer=p.address)
        f = wait_finished(d, "m", also=(p,))
        assert f.failed["m"].blocks == (7,) and "sent only 2 of 3" in f.failed["m"].reason
    finally:
        p.close()
        d.close()


def slow_writes(conn: KVConnector, delay: float) -> list[tuple[float, float]]:
    """Make the connector's transport writes land `delay` s late; returns (posted, ended) times."""
    import threading
    from p2pkv.transport import TransferHandle
    real_write, times = conn.transport.write, []

    def write(peer, segments, request_id=None, notify=None):
        h, posted = TransferHandle(str(peer), request_id, segments.nbytes), time.monotonic()

        def later():
            real_write(peer, segments, request_id, notify).wait(5)
            times.append((posted, time.monotonic()))
            h._finish()
        threading.Timer(delay, later).start()
        return h
    conn.transport.write = write
    return times


@pytest.mark.timeout(30)
def test_release_with_push_writes_in_flight_reports_the_hold_only_after_they_end():
    """The engine frees a released hold's blocks once it hears "saved": no write may
    still be reading them then."""
    p, d, *_ = pair("push")
    times = slow_writes(p, 0.5)
    try:
        d.load("r", [1, 2], peer=p.address)
        p.save("r", [5, 6])
        until(lambda: p.producer.holds["r"].inflight, p, d)
        p.release("r")
        wait_finished(p, "r", "saved", timeout=10, also=(d,))
        reported = time.monotonic()
        assert len(times) == 3 and max(e for _, e in times) <= reported
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_consumer_giving_up_stops_the_producer_pushing_further_layers():
    """After D reported a push load failed (the engine reuses its blocks), P must not
    start writing the layers it saves later into them."""
    p, d, *_ = pair("push", load_timeout=0.3)
    times = slow_writes(p, 0.8)
    try:
        d.load("g", [1, 2], peer=p.address)
        p.save("g", [5, 6], layer=0, final=False)
        f = wait_finished(d, "g", timeout=5, also=(p,))
        assert f.failed["g"].blocks == (1, 2)
        time.sleep(1.2)
        p.save("g", [5, 6], layer=1, final=False)
        p.save("g", [5, 6], layer=2)
        wait_finished(p, "g", "saved", timeout=5, also=(d,))
        time.sleep(0.3)
        assert len(times) == 1 and p.metrics["released_aborted"] == 1
    finally:
        p.close()
        d.close()


# ------------------------------------------------------------------ one peer never delays another

@pytest.mark.timeout(60)
def test_a_peer_that_never_answers_the_handshake_does_not_delay_a_load_from_a_healthy_one():
    """The stuck peer's dial waits out the 2 s handshake timeout in its own link thread; the
    healthy load, posted after it, finishes well within that, and the stuck one then fails."""
    import socket
    silent = socket.create_server(("127.0.0.1", 0))  # completes TCP connects in its backlog, never answers
    stuck = f"127.0.0.1:{silent.getsockname()[1]}"
    p = KVConnector("tcp", mode="pull")
    d = KVConnector("tcp", mode="pull", timeout=2, load_timeout=10)
    try:
        pt, pspec = caches("vllm_cpu", 16, "random", seed=3)
        dt, dspec = caches("vllm_cpu", 10, "zeros")
        p.register_kv_caches(pt, pspec)
        d.register_kv_caches(dt, dspec)
        p.save("healthy", [1, 2, 3])
        t0 = time.monotonic()
        d.load("stuck", [0, 1, 2], peer=stuck, remote_block_ids=[1, 2, 3])
        d.load("healthy", [4, 5, 6], peer=p.address, remote_block_ids=[1, 2, 3])
        f = wait_finished(d, "healthy", timeout=10, also=(p,))
        took = time.monotonic() - t0
        assert took < 1.5, f"healthy load took {took:.2f} s: it waited for the stuck peer's dial"
        assert not f.failed and "stuck" not in f.loaded
        for s, t in zip([1, 2, 3], [4, 5, 6]):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        f = wait_finished(d, "stuck", timeout=10, also=(p,))
        assert f.failed["stuck"].blocks == (0, 1, 2)
        assert stuck in f.failed["stuck"].reason and "cannot reach" in f.failed["stuck"].reason
        assert time.monotonic() - t0 < 6
    finally:
        d.close()
        p.close()
        silent.close()


@pytest.mark.timeout(90)
def test_a_frozen_producer_process_does_not_delay_loads_from_a_healthy_one():
    """Two producer processes, both already connected; one is frozen (SIGSTOP) with a read of
    it posted first: the other's load finishes at its usual pace, the frozen one's fails
    within the transport's timeout."""
    from procs import stop_process
    frozen, healthy = start_producer("pull", [1, 2, 3], requests=2), start_producer("pull", [4, 5, 6], requests=2)
    d = KVConnector("tcp", mode="pull", timeout=3, load_timeout=10)
    try:
        fp, hp = json.loads(frozen.stdout.readline()), json.loads(healthy.stdout.readline())
        dt, dspec = caches("vllm_cpu", 12, "zeros")
        d.register_kv_caches(dt, dspec)
        for name, params, dst in (("f1", fp, [0, 1, 2]), ("h1", hp, [3, 4, 5])):
            d.load(name, dst, peer=params["remote_address"], remote_request_id="tcp-req",
                   remote_block_ids=params["remote_block_ids"])
            assert not wait_finished(d, name, timeout=20).failed
        stopped_in = stop_process(frozen.pid)
        t0 = time.monotonic()
        d.load("f2", [6, 7, 8], peer=fp["remote_address"], remote_request_id="tcp-req-2",
               remote_block_ids=fp["remote_block_ids"])
        d.load("h2", [9, 10, 11], peer=hp["remote_address"], remote_request_id="tcp-req-2",
               remote_block_ids=hp["remote_block_ids"])
        f = wait_finished(d, "h2", timeout=20)
        took = time.monotonic() - t0
        assert took < 2.5, f"healthy load took {took:.2f} s: it waited for the frozen producer"
        assert not f.failed and "f2" not in f.loaded, f"frozen {stopped_in:.3f} s after SIGSTOP"
        pt, pspec = caches("vllm_cpu", 16, "random", seed=7)
        for s, t in zip([4, 5, 6], [9, 10, 11]):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        f = wait_finished(d, "f2", timeout=20)
        assert f.failed["f2"].blocks == (6, 7, 8) and fp["remote_address"] in f.failed["f2"].reason
        assert time.monotonic() - t0 < 3 + 2
        pm = json.loads(healthy.stdout.readline())
        assert pm["released_confirmed"] == 2 and healthy.wait(30) == 0
    finally:
        for proc in (frozen, healthy):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        d.close()


@pytest.mark.timeout(60)
def test_a_pull_load_waits_for_a_hold_that_p_publishes_late():
    """An engine hands out a request's transfer parameters before the step that publishes its hold,
    and that step may come late (a starved host). D's held read finds P not holding the request yet
    (after half of P's timeout), asks again, and loads once P holds it, within D's load timeout."""
    p, d = KVConnector("tcp", timeout=2), KVConnector("tcp", load_timeout=20)
    try:
        pt, pspec = caches("vllm", 16, "random", seed=1)
        dt, dspec = caches("vllm", 12, "zeros")
        p.register_kv_caches(pt, pspec)
        d.register_kv_caches(dt, dspec)
        d.load("late", [2, 5], peer=p.address, remote_block_ids=[7, 3])
        end = time.monotonic() + 3.5  # more than P's 1 s wait for a hold, several times over
        while time.monotonic() < end:
            step(d)
            time.sleep(0.01)
        assert "late" not in SEEN.get(d, Finished()).failed
        p.save("late", [7, 3])
        f = wait_finished(d, "late", also=(p,))
        assert not f.failed, f.failed
        assert [block_bytes(dt, dspec, b) for b in (2, 5)] == [block_bytes(pt, pspec, b) for b in (7, 3)]
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(60)
def test_push_from_two_producers_that_use_the_same_request_id_lands_each_in_its_own_load():
    """Two P engines may both call a request "r". D's Want names its own load and P echoes it, so
    what P2 pushed never counts for the load from P1 (which would then read blocks P1 never wrote)."""
    p1, p2, d = KVConnector("tcp", mode="push"), KVConnector("tcp", mode="push"), KVConnector("tcp", mode="push")
    try:
        (t1, s1), (t2, s2) = caches("vllm", 16, "random", seed=1), caches("vllm", 16, "random", seed=2)
        dt, dspec = caches("vllm", 12, "zeros")
        p1.register_kv_caches(t1, s1)
        p2.register_kv_caches(t2, s2)
        d.register_kv_caches(dt, dspec)
        d.load("a", [0, 1], peer=p1.address, remote_request_id="r", remote_block_ids=[4, 5])
        d.load("b", [2, 3], peer=p2.address, remote_request_id="r", remote_block_ids=[6, 7])
        for _ in range(20):
            step(d, p1, p2)
            time.sleep(0.01)
        p2.save("r", [6, 7])
        f = wait_finished(d, "b", also=(p1, p2))
        assert "a" not in f.loaded and not f.failed
        assert [block_bytes(dt, dspec, b) for b in (2, 3)] == [block_bytes(t2, s2, b) for b in (6, 7)]
        p1.save("r", [4, 5])
        assert not wait_finished(d, "a", also=(p1, p2)).failed
        assert [block_bytes(dt, dspec, b) for b in (0, 1)] == [block_bytes(t1, s1, b) for b in (4, 5)]
    finally:
        for c in (p1, p2, d):
            c.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_an_idle_producer_engine_still_finishes_its_side(mode):
    """P's engine saves and then makes no call at all (an idle vLLM P: its prefills are done). Its
    connector still dials D and pushes (push), or ends the hold on D's release (pull)."""
    p, d = KVConnector("tcp", mode=mode), KVConnector("tcp", mode=mode)
    try:
        pt, pspec = caches("vllm", 16, "random", seed=1)
        dt, dspec = caches("vllm", 12, "zeros")
        p.register_kv_caches(pt, pspec)
        d.register_kv_caches(dt, dspec)
        if mode == "push":
            d.load("r", [2, 5], peer=p.address, remote_block_ids=[7, 3])
            step(d)
            time.sleep(0.2)
            p.get_finished()  # reads D's request, as the engine's call before the prefill would
            p.save("r", [7, 3])
        else:
            p.save("r", [7, 3])
            d.load("r", [2, 5], peer=p.address, remote_block_ids=[7, 3])
        assert not wait_finished(d, "r").failed
        assert block_bytes(pt, pspec, 3) == block_bytes(dt, dspec, 5)
        end = time.monotonic() + 10
        while p.stats().holds_ended.get("confirmed") != 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert p.stats().holds_ended == {"confirmed": 1} and p.stats().held == 0
        assert "r" in p.get_finished().saved
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(30)
def test_the_idle_pump_stays_out_of_a_step_the_engine_is_computing():
    """Inside a step (a call came, its get_finished() not yet) the pump waits STEP_IDLE_S, not
    IDLE_PUMP_S: a thread of ours holding the GIL there stalls the engine's forward pass. After the
    step's get_finished() an idle engine's work moves on the pump again."""
    from p2pkv.connector import core
    p = KVConnector("tcp", mode="push")
    try:
        pt, pspec = caches("vllm", 16, "random", seed=1)
        p.register_kv_caches(pt, pspec)
        runs: list[float] = []
        real = p._progress

        def progress(engine: bool = True) -> None:
            if not engine:
                runs.append(time.monotonic())
            real(engine)
        p._progress = progress
        p.save("r", [7, 3], layer=0, final=False)  # a forward pass in progress: its first layer saved
        opened = time.monotonic()
        time.sleep(core.STEP_IDLE_S / 2)
        assert not runs, "the pump ran inside an open step"
        until(lambda: runs, timeout=core.STEP_IDLE_S * 3)
        assert runs[0] - opened >= core.STEP_IDLE_S * 0.9
        p.get_finished()  # the step ends; the hold is still open, so an idle engine needs the pump
        runs.clear()
        ended = time.monotonic()
        until(lambda: runs, timeout=5)
        assert runs[0] - ended < core.STEP_IDLE_S / 2
    finally:
        p.close()


@pytest.mark.timeout(30)
def test_control_messages_leave_from_the_engine_thread_when_the_transport_never_blocks_on_them():
    """A transport that declares `send_notif_blocks = False` gets control messages posted by the
    engine's own call once the peer is dialled, with no hop through the link's thread."""
    import threading
    p, d, (pt, pspec), (dt, dspec) = pair("pull")
    senders = []
    for c in (p, d):
        real = c.transport.send_notif
        c.transport.send_notif_blocks = False

        def send(peer, message, real=real):
            senders.append((message["p2pkv"], threading.current_thread() is threading.main_thread()))
            real(peer, message)
        c.transport.send_notif = send
    try:
        p.save("warm", [1])
        d.load("warm", [1], peer=p.address, remote_block_ids=[1])
        wait_finished(d, "warm", also=(p,))
        wait_finished(p, "warm", "saved", also=(d,))
        senders.clear()
        p.save("r", [7, 3])
        d.load("r", [2, 5], peer=p.address, remote_block_ids=[7, 3])
        assert not wait_finished(d, "r", also=(p,)).failed
        wait_finished(p, "r", "saved", also=(d,))
        assert senders == [("release", True)]  # the held read itself said "held": no question, no answer
        assert block_bytes(pt, pspec, 3) == block_bytes(dt, dspec, 5)
    finally:
        p.close()
        d.close()


@pytest.mark.timeout(60)
def test_producer_restarted_on_the_same_address_is_redialled_without_failing_the_load():
    """D's connection to the old producer is stale; the first read finds it closed, and the load
    reads again over a fresh dial instead of sending the request to be recomputed."""
    dt, dspec = caches("vllm_cpu", 10, "zeros")
    d = KVConnector("tcp", mode="pull", timeout=5)
    d.register_kv_caches(dt, dspec)
    old = KVConnector("tcp", mode="pull")
    old.register_kv_caches(*caches("vllm_cpu", 16, "random", seed=1))
    address = old.address
    new = None
    try:
        old.save("a", [1, 2])
        d.load("a", [0, 1], peer=address, remote_block_ids=[1, 2])
        assert not wait_finished(d, "a", also=(old,)).failed
        old.close()
        new = KVConnector("tcp", mode="pull", listen=address)
        pt, pspec = caches("vllm_cpu", 16, "random", seed=2)
        new.register_kv_caches(pt, pspec)
        new.save("b", [5, 6, 7])
        d.load("b", [2, 3, 4], peer=address, remote_block_ids=[5, 6, 7])
        f = wait_finished(d, "b", also=(new,))
        assert not f.failed, f.failed
        for s, t in zip([5, 6, 7], [2, 3, 4]):
            assert block_bytes(pt, pspec, s) == block_bytes(dt, dspec, t)
        assert d.metrics["load_retries"] == 1
        wait_finished(new, "b", "saved", also=(d,))
    finally:
        d.close()
        old.close()
        if new is not None:
            new.close()


@pytest.mark.timeout(30)
def test_malformed_or_hostile_control_messages_never_fail_the_engines_call():
    """What a peer sends is parsed once into a typed message; one that does not parse, or names
    blocks outside the cache, is logged and dropped, and the next load still works."""
    p, d, (pt, pspec), (dt, dspec) = pair("pull", checksum=True)
    try:
        peer = d.transport.connect(p.address)
        for bad in ({"p2pkv": "want", "req": "x", "blocks": "nope", "offset": 0, "addr": d.address},
                    {"p2pkv": "want", "req": "x", "blocks": [1], "offset": -1, "addr": d.address},
                    {"p2pkv": "sum?", "req": "y", "blocks": [999], "addr": d.address},
                    {"p2pkv": "held?", "req": 5, "addr": d.address},
                    {"p2pkv": "landed", "req": "z", "layer": "0", "n": 1},
                    {"p2pkv": "teleport", "req": "z"}, {"hello": "world"}):
            d.transport.send_notif(peer, bad)
        assert p.get_finished() == Finished() and p.holding() == {}
        p.save("ok", [7, 3])
        d.load("ok", [2, 5], peer=p.address, remote_block_ids=[7, 3])
        assert not wait_finished(d, "ok", also=(p,)).failed
        assert block_bytes(pt, pspec, 3) == block_bytes(dt, dspec, 5)
    finally:
        p.close()
        d.close()


def test_each_message_kind_round_trips_through_its_dict():
    from p2pkv.connector import messages as m
    samples = [m.Release("r", ok=False), m.Cancel("r"), m.Want("r", (4, 5), 1, "load-1"), m.HeldQuery("r"),
               m.SumQuery("r", (7,)), m.Landed("r", 2, 3, (11, 12, 13)), m.Landed("r", 0, 1),
               m.Abort("r", "disk on fire"), m.Held("r", gone=True), m.Sums("r", ((1, 2), (3, 4)), gone=False)]
    for msg in samples:
        assert m.parse(msg.to_dict()) == msg
    assert m.parse({"p2pkv": "nothing-we-know", "req": "r"}) is None
    with pytest.raises(m.BadMessage, match="want.blocks must be a list"):
        m.parse({"p2pkv": "want", "req": "r", "blocks": 3})
    # an older peer still names an address: it is ignored, never used to reach anyone
    assert m.parse({"p2pkv": "held?", "req": "r", "addr": "10.9.9.9:1"}) == m.HeldQuery("r")
    assert "addr" not in m.Want("r", (1,)).to_dict()


_IDLE_PUMP_AFFINITY = """
import threading, time
import torch
from p2pkv.connector import KVConnector
from p2pkv.layout import make_kv_caches
t, s = make_kv_caches("vllm", num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_size=8, dtype=torch.float16)
with KVConnector("tcp") as c:
    c.register_kv_caches(t, s)
    pump = next(x for x in threading.enumerate() if x.name == "p2pkv-connector-idle")
    time.sleep(0.2)
    print(sorted(os.sched_getaffinity(pump.native_id)))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_idle_pump_leaves_the_core_the_engine_pinned():
    """register_kv_caches() runs on the engine's pinned thread; the idle pump it starts takes every
    CPU (P2PKV_IO_CPUS unset), so it never waits behind the engine for that core."""
    from procs import run_pinned
    assert run_pinned(_IDLE_PUMP_AFFINITY, timeout=100) == sorted(os.sched_getaffinity(0))
