"""TCP backend across real processes on loopback: byte-exact transfers for every
layout and dtype, both directions, and the failures a user meets."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

from kvcheck import assert_same, expected_after
from p2pkv.layout import PRESETS, BlockRows, KVCacheSpec, make_kv_caches, plan_segments
from p2pkv.transport import PeerClosedError, TransferError, TransferTimeout, get_transport
from p2pkv.transport.tcp import TcpTransport
from p2pkv.wire import AuthError, HandshakeError
from peer import build
from procs import peer_process

DTYPES = ["bf16", "fp16", "fp32"] + (["fp8"] if hasattr(torch, "float8_e4m3fn") else [])


def local_cache(cfg: dict, seed: int = 777):
    return build({**cfg, "seed": seed})


@pytest.mark.timeout(120)
def test_read_every_layout_and_dtype_is_byte_exact():
    configs = [{"layout": lay, "dtype": dt, "seed": i} for i, (lay, dt) in
               enumerate((lay, dt) for lay in PRESETS for dt in DTYPES)]
    rng = np.random.default_rng(0)
    with peer_process("tcp", configs) as p:
        for cfg, addr in zip(configs, p.addresses):
            d_tensors, d_spec = local_cache(cfg)
            before = [t.clone() for t in d_tensors]
            p_tensors, _ = build(cfg)
            with get_transport("tcp", timeout=20) as tr:
                tr.register(d_tensors, d_spec)
                peer = tr.connect(addr)
                n = int(rng.integers(1, 12))
                src = rng.choice(24, n, replace=False)
                dst = rng.choice(24, n, replace=False)
                tr.read(peer, plan_segments(peer.spec, d_spec, src, dst), request_id=f"{cfg}").wait(20)
            assert_same(d_tensors, expected_after(cfg["layout"], before, p_tensors, src, dst))


@pytest.mark.timeout(60)
def test_write_lands_in_exactly_the_destination_blocks(tmp_path):
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 5}
    with peer_process("tcp", [cfg]) as p:
        mine, spec = local_cache(cfg, seed=99)
        theirs_before, _ = build(cfg)
        with get_transport("tcp") as tr:
            tr.register(mine, spec)
            peer = tr.connect(p.addresses[0])
            src, dst = [3, 4, 5, 17], [20, 2, 9, 10]
            tr.write(peer, plan_segments(spec, peer.spec, src, dst), "w1").wait(20)
            raw = p.dump(0, tmp_path / "p.bin")
        expect = expected_after("vllm", theirs_before, mine, src, dst)
        got = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        assert torch.equal(got, torch.cat([e.reshape(-1) for e in expect]))


@pytest.mark.timeout(60)
def test_concurrent_requests_to_one_peer_do_not_mix():
    cfg = {"layout": "block_first", "dtype": "fp16", "seed": 3, "blocks": 64}
    with peer_process("tcp", [cfg]) as p:
        d, spec = local_cache(cfg)
        before = [t.clone() for t in d]
        ptens, _ = build(cfg)
        with get_transport("tcp") as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])
            perm = np.random.default_rng(1).permutation(64)
            handles, src_all, dst_all = [], [], []
            for r in range(8):
                src, dst = perm[r * 8:(r + 1) * 8], np.roll(perm, 5)[r * 8:(r + 1) * 8]
                handles.append(tr.read(peer, plan_segments(peer.spec, spec, src, dst), f"req-{r}"))
                src_all += list(src)
                dst_all += list(dst)
            for h in handles:
                h.wait(20)
                assert h.done() and h.error is None
        assert_same(d, expected_after("block_first", before, ptens, src_all, dst_all))


def _cache(layout="vllm", **kw):
    args = dict(num_layers=2, num_blocks=24, block_size=4, num_kv_heads=2, head_size=8, dtype="bf16", fill="zeros")
    args.update(kw)
    return make_kv_caches(layout, **args)


@pytest.mark.timeout(30)
def test_spec_mismatch_is_refused_on_both_sides_naming_the_field(caplog):
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        a.register(*_cache(head_size=8))
        b.register(*_cache(head_size=16))
        with pytest.raises(HandshakeError, match="head_size"):
            b.connect(a.address)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_incompatible_byte_order_is_refused():
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        a.register(*_cache("vllm"))
        b.register(*_cache("vllm_cpu"))
        with pytest.raises(HandshakeError, match="byte order"):
            b.connect(a.address)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_block_first_and_vllm_interoperate_by_plain_byte_copy():
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        ta, sa = _cache("vllm", fill="random", generator=torch.Generator().manual_seed(1))
        tb, sb = _cache("block_first")
        a.register(ta, sa)
        b.register(tb, sb)
        peer = b.connect(a.address)
        b.read(peer, plan_segments(sa, sb, [1, 2, 7], [0, 5, 6]), "x").wait(10)
        for la, lb in zip(ta, tb):
            assert torch.equal(la[:, [1, 2, 7]].permute(1, 0, 2, 3, 4).view(torch.uint8), lb[[0, 5, 6]].view(torch.uint8))
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_auth_token_mismatch_and_missing_token_are_refused():
    a = get_transport("tcp", auth_token="s3cret")
    b = get_transport("tcp", auth_token="wrong")
    c = get_transport("tcp")
    ok = get_transport("tcp", auth_token="s3cret")
    try:
        for t in (a, b, c, ok):
            t.register(*_cache())
        with pytest.raises(AuthError):
            b.connect(a.address)
        with pytest.raises(AuthError):
            c.connect(a.address)
        peer = ok.connect(a.address)
        ok.read(peer, plan_segments(peer.spec, ok.spec, [1], [2]), "after-refusals").wait(10)
    finally:
        for t in (a, b, c, ok):
            t.close()


@pytest.mark.timeout(30)
def test_bad_addresses_and_unreachable_peers():
    with get_transport("tcp") as t:
        t.register(*_cache())
        with pytest.raises(ValueError, match="host:port"):
            t.connect("not-an-address")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        with pytest.raises(PeerClosedError, match=f"127.0.0.1:{port}"):
            t.connect(f"127.0.0.1:{port}")
        with pytest.raises(ValueError, match="connect"):
            t.read("127.0.0.1:1", plan_segments(t.spec, t.spec, [1], [1]))


@pytest.mark.timeout(30)
def test_port_in_use_is_a_clear_error():
    with get_transport("tcp") as t:
        with pytest.raises(OSError, match="cannot listen"):
            get_transport("tcp", listen=t.address)


@pytest.mark.timeout(30)
def test_stalled_peer_times_out_instead_of_hanging():
    srv = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    try:
        with get_transport("tcp", timeout=1.0) as t:
            t.register(*_cache())
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout):
                t.connect("%s:%d" % srv.getsockname())
            assert time.monotonic() - t0 < 5
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_segment_tables_of_many_odd_rows_and_rows_larger_than_a_batch_land_exactly():
    """The native vectored calls move at most 1024 rows and ~4 MiB per syscall, and a receive that
    is faster than its sender returns partway: a table of 3000 odd-sized rows in random order and
    rows of 24 and 16 MiB must land every byte where it belongs, and nothing elsewhere."""
    from p2pkv.segments import Segments
    rng = np.random.default_rng(7)
    src = torch.from_numpy(rng.integers(0, 256, 48 << 20, dtype=np.uint8))
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        ta = [src.view(1, -1)]
        tb = [torch.zeros(1, 48 << 20, dtype=torch.uint8)]
        a.register(ta, KVCacheSpec.from_tensors(ta, num_blocks=1))
        b.register(tb, KVCacheSpec.from_tensors(tb, num_blocks=1))
        lens = rng.integers(1, 2000, 3000)
        starts = np.cumsum(rng.integers(0, 64, 3000) + lens) - lens
        order = rng.permutation(3000)
        off = np.concatenate([starts[order], [8 << 20, 32 << 20]]).astype(np.int64)
        length = np.concatenate([lens[order], [24 << 20, 16 << 20]]).astype(np.int64)
        segs = Segments(np.zeros(len(off), dtype=np.int32), off, off, length)
        b.read(b.connect(a.address), segs, "odd-rows").wait(30)
    finally:
        a.close()
        b.close()
    moved = np.zeros(48 << 20, dtype=bool)
    for o, n in zip(off.tolist(), length.tolist()):
        moved[o:o + n] = True
    got, want = tb[0][0].numpy(), src.numpy()
    assert np.array_equal(got[moved], want[moved]) and not got[~moved].any()


def test_advise_hugepages_keeps_the_bytes_and_touches_only_aligned_interiors():
    from p2pkv.transport.base import HUGE_PAGE, advise_hugepages
    flat = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8)
    before = flat.clone()
    parts = [flat[i * (3 << 20):(i + 1) * (3 << 20)] for i in range(3)]
    advised = advise_hugepages(parts)
    assert advised % HUGE_PAGE == 0 and advised <= flat.numel()
    assert torch.equal(flat, before)
    assert advise_hugepages([]) == 0


def test_iovecs_merge_only_rows_that_follow_each_other_in_memory():
    from p2pkv.transport.tcp import iovecs
    bases = np.array([1 << 20, 1 << 21], dtype=np.uintp)
    iov = iovecs(bases, np.array([0, 0, 0, 1, 1, 0, 0]), np.array([0, 10, 30, 0, 5, 40, 40]),
                 np.array([10, 20, 5, 5, 5, 1, 1]))
    assert iov.tolist() == [[(1 << 20), 35], [(1 << 21), 10], [(1 << 20) + 40, 1], [(1 << 20) + 40, 1]]
    assert iovecs(bases, *(np.zeros(0, dtype=np.int64),) * 3).shape == (0, 2)


@pytest.mark.timeout(60)
def test_requests_by_block_ids_and_by_segment_table_land_the_same_bytes():
    """Planned segments travel as block ids (P computes its own rows), hand-made ones as a table:
    reads and writes, every region or one layer's, land the same bytes either way."""
    from p2pkv.segments import Segments
    rng = np.random.default_rng(5)
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(8))
        a.register(ta, sa)
        tb, sb = _cache()
        b.register(tb, sb)
        peer = b.connect(a.address)
        for step in range(6):
            src, dst = rng.choice(24, 7, replace=False), rng.choice(24, 7, replace=False)
            planned = plan_segments(peer.spec, sb, src, dst)
            if step % 3 == 2:
                keep = np.isin(planned.region, [1])
                planned = Segments(planned.region[keep], planned.src[keep], planned.dst[keep], planned.length[keep],
                                   planned.plan.only([1]))
            table = Segments(planned.region, planned.src, planned.dst, planned.length)
            results = []
            for segs in (planned, table):
                for t in tb:
                    t.view(torch.uint8).fill_(0x33)
                b.read(peer, segs, request_id=f"read-{step}").wait(10)
                results.append([t.view(torch.uint8).clone() for t in tb])
            assert all(torch.equal(x, y) for x, y in zip(*results))
            want = expected_after("vllm", [t.view(torch.uint8).clone().fill_(0x33) for t in tb], ta, src, dst)
            if step % 3 == 2:
                want = [w if i == 1 else torch.full_like(w, 0x33) for i, w in enumerate(want)]
            assert_same(tb, want)
            back = plan_segments(sb, peer.spec, dst, src)
            for t in ta:
                t.view(torch.uint8)[:] = 7
            b.write(peer, back, request_id=f"write-{step}").wait(10)
            for t_a, t_b in zip(ta, tb):
                assert torch.equal(t_a[:, torch.as_tensor(src)].view(torch.uint8), t_b[:, torch.as_tensor(dst)].view(torch.uint8))
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(90)
def test_a_peer_is_served_while_ps_python_never_runs():
    """P's engine holds the GIL and never gives it up; D dials P for the first time and reads. The
    native acceptor hand-shakes D and serves the read with no Python of P's process running."""
    cfg = {"layout": "vllm", "seed": 6}
    with peer_process("tcp", [cfg]) as p:
        d_tensors, d_spec = local_cache(cfg)
        p.proc.stdin.write("freeze 60\n")
        p.proc.stdin.flush()
        assert p.proc.stdout.readline().strip() == "FROZEN"
        with get_transport("tcp", timeout=30) as tr:
            tr.register(d_tensors, d_spec)
            peer = tr.connect(p.addresses[0])
            before = [t.clone() for t in d_tensors]
            tr.read(peer, plan_segments(peer.spec, d_spec, [1, 5, 6], [0, 2, 3]), "frozen-p").wait(30)
            assert_same(d_tensors, expected_after("vllm", before, build(cfg)[0], [1, 5, 6], [0, 2, 3]))
            assert p.proc.poll() is None


@pytest.mark.timeout(60)
def test_a_geometry_that_reaches_outside_the_serving_sides_memory_is_refused_and_ends_the_connection():
    """The dialling side describes the serving side's rows of a block (GEOMETRY); P checks every piece
    of every block against its own regions, refuses one that reaches past them with the reason, and
    goes on serving honest peers."""
    from p2pkv.transport import native as nat
    cfg = {"layout": "vllm", "seed": 4}
    with peer_process("tcp", [cfg]) as p:
        d_tensors, d_spec = local_cache(cfg)
        with get_transport("tcp", timeout=20) as tr:
            tr.register(d_tensors, d_spec)
            peer = tr.connect(p.addresses[0])
            rows = BlockRows(peer.spec, d_spec)
            body = bytearray(nat.geometry_body(rows, "src", False))
            body[8:16] = (int(rows.num_blocks[0]) * 4).to_bytes(8, "little")  # 4x the blocks P has
            link = tr._out[peer.address].link
            link.post(nat.OP_SEND, nat.frame(nat.GEOMETRY, bytes(body)), None, None, 0)
            req = nat.request_body(nat.FORM_BLOCKS, "evil", np.asarray([0], "<i8").tobytes(), 1, None)
            op = link.post(nat.OP_READ, nat.frame(nat.DATA_READ, req, 0), None, None, 0)
            with pytest.raises(TransferError, match="block geometry refused: region 0: a block's piece ends past"):
                nat.NativeHandle(op, peer.name, "evil", 0).wait(10)
            tr.close()
        with get_transport("tcp", timeout=20) as tr:
            tr.register(d_tensors, d_spec)
            peer = tr.connect(p.addresses[0])
            before = [t.clone() for t in d_tensors]
            tr.read(peer, plan_segments(peer.spec, d_spec, [2, 7], [3, 0]), "good").wait(10)
            assert_same(d_tensors, expected_after("vllm", before, build(cfg)[0], [2, 7], [3, 0]))


@pytest.mark.timeout(60)
def test_block_requests_naming_bad_ids_or_regions_are_refused_by_the_serving_side():
    """A hostile D that skips its own checks (frames written by hand here) is refused by P's native
    server with the reason, and P goes on serving good requests."""
    from p2pkv.transport import native as nat
    cfg = {"layout": "vllm", "seed": 3}
    cases = [(True, [1, 10**6], None, "source block id 1000000 out of range"),
             (True, [1], [0, 99], "regions name 99, outside the 2 registered"),
             (False, [5, 5], None, "duplicate destination block id 5"),
             (True, [-1], None, "source block id -1 out of range"),
             # 600k copies of one block would expand to 2.4M rows (vllm: 2 layers x K/V) on P
             (True, [0] * 600_000, None, "600000 blocks of 4 rows each exceed the limit")]
    with peer_process("tcp", [cfg]) as p:
        d_tensors, d_spec = local_cache(cfg)
        with get_transport("tcp", timeout=20) as tr:
            tr.register(d_tensors, d_spec)
            for read, ids, regions, why in cases:
                peer = tr.connect(p.addresses[0])
                link = tr._out[peer.address].link
                for rows, write in ((BlockRows(peer.spec, d_spec), False), (BlockRows(d_spec, peer.spec), True)):
                    body = nat.geometry_body(rows, "dst" if write else "src", write)
                    link.post(nat.OP_SEND, nat.frame(nat.GEOMETRY, body), None, None, 0)
                body = nat.request_body(nat.FORM_BLOCKS, "evil", np.asarray(ids, "<i8").tobytes(), len(ids), regions)
                op = tr._out[peer.address].link.post(nat.OP_READ if read else nat.OP_WRITE,
                                                     nat.frame(nat.DATA_READ if read else nat.DATA_WRITE, body, 0),
                                                     None, None, 0)
                with pytest.raises(TransferError, match=f"request 'evil' refused: {why}"):
                    nat.NativeHandle(op, peer.name, "evil", 0).wait(10)
            peer = tr.connect(p.addresses[0])
            before = [t.clone() for t in d_tensors]
            tr.read(peer, plan_segments(peer.spec, d_spec, [0, 9], [4, 1]), "good").wait(10)
            assert_same(d_tensors, expected_after("vllm", before, build(cfg)[0], [0, 9], [4, 1]))


@pytest.mark.timeout(60)
def test_threads_sharing_one_connection_keep_every_request_whole(tmp_path):
    """Reads start in the caller's thread when the connection is idle and queue behind the running
    op otherwise: three reading threads and one writing thread on one connection must each move
    exactly their own blocks (a read frame sent in the middle of a write's payload would not)."""
    cfg = {"layout": "vllm", "dtype": "bf16", "seed": 9, "blocks": 64}
    with peer_process("tcp", [cfg]) as p:
        d, spec = local_cache(cfg)
        before = [t.clone() for t in d]
        p_before, _ = build(cfg)
        with get_transport("tcp", timeout=20) as tr:
            tr.register(d, spec)
            peer = tr.connect(p.addresses[0])
            src_of: dict[int, int] = {}
            wrote: dict[int, int] = {}
            errors: list[BaseException] = []

            def reader(k: int) -> None:
                rng = np.random.default_rng(k)
                mine = np.arange(k * 16, (k + 1) * 16)  # D blocks this thread reads into
                try:
                    for i in range(12):
                        dst, src = rng.choice(mine, 3, replace=False), rng.choice(48, 3, replace=False)
                        h = tr.read(peer, plan_segments(peer.spec, spec, src, dst), f"r{k}-{i}")
                        if i % 3 == 2:
                            time.sleep(0.001)  # let other threads' requests queue up behind it
                        h.wait(20)
                        src_of.update(zip(dst.tolist(), src.tolist()))
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            def writer() -> None:
                rng = np.random.default_rng(7)
                try:
                    for i in range(12):  # D blocks 48..63 (no reader's) into P blocks 48..63 (no reader's)
                        src, dst = rng.choice(16, 4, replace=False) + 48, rng.choice(16, 4, replace=False) + 48
                        tr.write(peer, plan_segments(spec, peer.spec, src, dst), f"w-{i}").wait(20)
                        wrote.update(zip(dst.tolist(), src.tolist()))
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
            threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)] + [threading.Thread(target=writer)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(50)
            assert not errors, errors
            assert tr._out[p.addresses[0]].pending == 0
            raw = p.dump(0, tmp_path / "p.bin")
        dst, src = zip(*sorted(src_of.items()))
        assert_same(d, expected_after("vllm", before, p_before, src, dst))
        pdst, psrc = zip(*sorted(wrote.items()))
        want = expected_after("vllm", p_before, d, psrc, pdst)
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.uint8), torch.cat([w.reshape(-1) for w in want]))


@pytest.mark.timeout(30)
def test_a_request_of_more_rows_than_the_limit_is_refused_before_sending(monkeypatch):
    import p2pkv.transport.posting as posting
    monkeypatch.setattr(posting, "MAX_SEGMENTS", 10)
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        a.register(*_cache(fill="random", generator=torch.Generator().manual_seed(1)))
        b.register(*_cache())
        peer = b.connect(a.address)
        with pytest.raises(ValueError, match="3 blocks of 4 rows each exceed the limit of 10 rows per request"):
            b.read(peer, plan_segments(a.spec, b.spec, [1, 2, 3], [4, 5, 6]), "too-big")
        b.read(peer, plan_segments(a.spec, b.spec, [1, 2], [4, 5]), "fits").wait(10)
        assert torch.equal(b.tensors[0][:, 4].view(torch.uint8), a.tensors[0][:, 1].view(torch.uint8))
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["tcp", "loopback"])
@pytest.mark.parametrize("opts, exc, why", [
    ({"timeout": float("nan")}, ValueError, "positive, finite"),
    ({"timeout": float("inf")}, ValueError, "positive, finite"),
    ({"timeout": "5"}, TypeError, "timeout must be a number"),
    ({"auth_token": 123}, TypeError, "auth_token must be a str or bytes"),
    ({"auth_token": ""}, ValueError, "auth_token is empty"),
])
def test_bad_timeout_and_auth_token_are_refused_up_front(backend, opts, exc, why):
    with pytest.raises(exc, match=why):
        get_transport(backend, **opts)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["tcp", "loopback"])
def test_the_name_option_names_the_transport_not_the_backend(backend):
    with get_transport(backend, name="prefill-0") as t:
        assert t.local_name == "prefill-0" and t.name == backend


@pytest.mark.timeout(30)
@pytest.mark.parametrize("opts, exc, why", [
    ({"listen": "127.0.0.1:99999"}, ValueError, "listen address '127.0.0.1:99999': port 99999 is out of range"),
    ({"listen": 5555}, ValueError, "listen address must be a 'host:port' string, got int"),
    ({"sock_buf_bytes": -5}, ValueError, "sock_buf_bytes must be at least 0"),
    ({"staging_bytes": "16M"}, TypeError, "staging_bytes must be an int"),
    ({"staging_bytes": 0}, ValueError, "staging_bytes must be at least 65536"),
    ({"hugepages": "no"}, TypeError, "hugepages must be True or False"),
])
def test_bad_tcp_options_are_refused_without_leaving_a_listener(opts, exc, why):
    def accept_threads() -> int:
        return sum(t.name == "p2pkv-tcp-accept" for t in threading.enumerate())
    before = accept_threads()
    with pytest.raises(exc, match=why):
        get_transport("tcp", **opts)
    assert accept_threads() == before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["tcp", "loopback"])
def test_register_refuses_tensors_its_spec_does_not_describe(backend):
    tensors, spec = _cache()
    cases = [
        (lambda: (tensors, _cache(num_blocks=8)[1]), ValueError, "spans 6144 bytes but the spec describes region 0 as 8 blocks"),
        (lambda: (tensors, _cache(dtype="fp32")[1]), ValueError, "does not match the spec's dtype 'float32'"),
        (lambda: (tensors[0], spec), ValueError, "1 tensors given for a spec of 2 regions"),
        (lambda: ([tensors[0], torch.empty_like(tensors[1], device="meta")], spec), ValueError, "several devices"),
        (lambda: ([1, 2], spec), TypeError, "KV tensor 0 is a int, not a torch.Tensor"),
        (lambda: (tensors, spec.to_dict()), TypeError, "spec must be a KVCacheSpec"),
    ]
    with get_transport(backend) as t:
        for make, exc, why in cases:
            with pytest.raises(exc, match=why):
                t.register(*make())
        assert t.spec is None
        t.register(tensors, spec)
        with pytest.raises(RuntimeError, match="already registered"):
            t.register(*_cache())
        assert t.tensors[0] is tensors[0]


@pytest.mark.timeout(30)
def test_bad_request_arguments_are_refused_at_entry_and_the_connection_lives_on():
    """Each bad argument is a TypeError/ValueError from the call itself; none costs the connection
    (before, several failed on the handle only after the connection to the peer was dropped)."""
    from p2pkv.segments import Segments
    a, b = get_transport("tcp"), get_transport("tcp")
    try:
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(2))
        a.register(ta, sa)
        b.register(*_cache())
        peer = b.connect(a.address)
        conn = b._out[a.address]
        segs = plan_segments(sa, b.spec, [1], [2])
        one = np.array([0])
        calls = [
            (lambda: b.read(peer, segs, 123), TypeError, "request_id must be a str or None, got int"),
            (lambda: b.read(peer, segs, "x" * (40 << 20)), ValueError, "is 41943040 bytes long; the limit is 1024"),
            (lambda: b.write(peer, segs, "w", notify={"k": object()}), TypeError, "notify cannot be sent"),
            (lambda: b.write(peer, segs, "w", notify={1: 2}), TypeError, "notify cannot be sent: int is not allowed"),
            (lambda: b.write(peer, segs, "w", notify=["done"]), TypeError, "notify must be a dict"),
            (lambda: b.write(peer, segs, "w", notify={"k": bytes(40 << 20)}), ValueError,
             "notify message exceeds the limit of 1048576 bytes"),
            (lambda: b.send_notif(peer, ["done"]), TypeError, "notification must be a dict"),
            (lambda: b.send_notif(peer, {3: "x"}), TypeError, "notification cannot be sent"),
            (lambda: b.read(peer, None, "r"), TypeError, "segments must be a p2pkv Segments"),
            (lambda: b.read(peer, Segments(one, one * 0.5, one, one + 16), "r"), TypeError,
             "Segments.src must be a 1-D numpy array of integers"),
            (lambda: b.read(peer, Segments(np.array([0, 0]), one, one, one + 16), "r"), ValueError,
             "Segments arrays differ in length: region 2, src 1, dst 1, length 1"),
            (lambda: b.read(object(), segs, "r"), TypeError, "peer must be a Peer from connect"),
            (lambda: b.baseline(peer, 0), ValueError, "nbytes must be an int from 1"),
        ]
        for call, exc, why in calls:
            with pytest.raises(exc, match=why):
                call()
        b.write(peer, Segments.empty(), "empty", notify={"k": 1}).wait(10)
        b.read(peer, segs, "good").wait(10)
        assert b._out[a.address] is conn and conn.dead is None
        assert torch.equal(b.tensors[0][:, 2].view(torch.uint8), ta[0][:, 1].view(torch.uint8))
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_calls_before_register_and_after_close_are_runtime_errors():
    a = get_transport("tcp")
    with a, get_transport("tcp") as b:
        for call in (lambda: b.read(a.address, None), lambda: b.write(a.address, None), lambda: b.send_notif(a.address, {})):
            with pytest.raises(RuntimeError, match="register"):
                call()
        a.register(*_cache())
        b.register(*_cache())
        peer = b.connect(a.address)
        segs = plan_segments(a.spec, b.spec, [1], [2])
        address = b.address
        b.close()
        b.close()
        assert b.address == address
        for call in (lambda: b.read(peer, segs, "r"), lambda: b.write(peer, segs, "w"), lambda: b.send_notif(peer, {}),
                     lambda: b.connect(a.address), lambda: b.register(*_cache()), lambda: b.baseline(peer, 1)):
            with pytest.raises(RuntimeError, match="tcp transport is closed"):
                call()
        assert b.get_notifs() == [] and b.peers() == []


@pytest.mark.timeout(30)
def test_wait_refuses_negative_and_nan_timeouts():
    from p2pkv.transport import TransferHandle
    h = TransferHandle("peer-x", "req-w", 0)
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            h.wait(bad)
    with pytest.raises(TypeError, match="number of seconds or None"):
        h.wait("1")
    with pytest.raises(TransferTimeout, match="req-w"):
        h.wait(0)
    h._finish()
    h.wait(0)
    h.wait(float("inf"))


@pytest.mark.timeout(30)
def test_a_host_name_that_does_not_resolve_in_time_fails_within_the_timeout(monkeypatch):
    """Python's dial (TLS) bounds the system resolver by the timeout; the native dial does the same
    in C++, where a stuck resolver cannot be simulated, so a name that does not exist stands in."""
    with get_transport("tcp", timeout=1) as t:
        t.register(*_cache())
        with pytest.raises(TransferError, match="no-such-host.invalid:5555 failed: cannot connect: cannot resolve host"):
            t.connect("no-such-host.invalid:5555")
    monkeypatch.setattr(TcpTransport, "_native_setup", False)
    real, release = socket.getaddrinfo, threading.Event()

    def stuck(host, *a, **kw):
        if host == "stuck.example":
            release.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    try:
        with get_transport("tcp", timeout=1) as t:
            t.register(*_cache())
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout, match="stuck.example:5555 failed: cannot connect: cannot resolve host"):
                t.connect("stuck.example:5555")
            assert time.monotonic() - t0 < 10
            with pytest.raises(TransferError, match="no-such-host.invalid:5555"):
                t.connect("no-such-host.invalid:5555")
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_descriptors_above_1023_serve_and_transfer():
    """An engine process easily holds more than 1024 descriptors: listener, accepted and dialled
    sockets numbered above select()'s limit must still handshake, serve and move blocks."""
    import os
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard descriptor limit here is {hard}")
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    a = b = None
    try:
        a, b = get_transport("tcp"), get_transport("tcp")
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(4))
        a.register(ta, sa)
        b.register(*_cache())
        peer = b.connect(a.address)
        assert a._listener.fileno() > 1023
        b.read(peer, plan_segments(a.spec, b.spec, [1, 2], [3, 4]), "high-fds").wait(10)
        b.send_notif(peer, {"k": "v"})
        deadline = time.monotonic() + 10
        got = []
        while not got and time.monotonic() < deadline:
            got = a.get_notifs()
        assert [n.message for n in got] == [{"k": "v"}]
        assert torch.equal(b.tensors[0][:, 3].view(torch.uint8), ta[0][:, 1].view(torch.uint8))
    finally:
        for t in (a, b):
            if t is not None:
                t.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(30)
def test_held_reads_are_served_only_while_the_request_is_held():
    """P serves a held read only while it holds the request: one round trip means "held and sent";
    after unhold the read fails with RequestGone at once, moves nothing, and the connection stays up.
    A read that comes before P published the hold waits for it (up to half of P's timeout), then
    fails with RequestNotHeldYet, so D can ask again."""
    from p2pkv.transport import RequestGone, RequestNotHeldYet
    a, b = get_transport("tcp", timeout=4), get_transport("tcp")
    try:
        ta, sa = _cache(fill="random", generator=torch.Generator().manual_seed(6))
        a.register(ta, sa)
        b.register(*_cache())
        peer = b.connect(a.address)
        assert a.holds_reads and b.holds_reads
        a.hold("req-1")
        b.read_held(peer, plan_segments(a.spec, b.spec, [1], [2]), "req-1").wait(10)
        assert torch.equal(b.tensors[0][:, 2].view(torch.uint8), ta[0][:, 1].view(torch.uint8))
        end = time.monotonic() + 5
        while a.serving("req-1") and time.monotonic() < end:  # P's thread ends its count after the last byte
            time.sleep(0.001)
        assert a.unhold("req-1") and not a.serving("req-1")
        before = [t.clone() for t in b.tensors]
        t0 = time.monotonic()
        with pytest.raises(RequestGone, match="req-1"):
            b.read_held(peer, plan_segments(a.spec, b.spec, [3], [4]), "req-1").wait(10)
        assert time.monotonic() - t0 < 1  # let go: refused without waiting
        with pytest.raises(RequestNotHeldYet, match="does not hold this request yet"):
            b.read_held(peer, plan_segments(a.spec, b.spec, [3], [4]), "never-held").wait(10)
        assert time.monotonic() - t0 >= 2  # never seen: waited half of P's 4 s for a hold
        assert all(torch.equal(x, y) for x, y in zip(before, b.tensors))
        early = b.read_held(peer, plan_segments(a.spec, b.spec, [7], [8]), "saved-late")
        time.sleep(0.3)
        assert not early.done()
        a.hold("saved-late")
        early.wait(10)
        assert torch.equal(b.tensors[0][:, 8].view(torch.uint8), ta[0][:, 7].view(torch.uint8))
        b.read(peer, plan_segments(a.spec, b.spec, [5], [6]), "plain").wait(10)  # the link lived on
        assert b.peers() == [peer]
    finally:
        a.close()
        b.close()
