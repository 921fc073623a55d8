"""Layout math: specs read from shapes and strides, and segment plans that cover
exactly the requested bytes, never overlap, stay in range and are as few as the runs allow."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pkv.layout import PRESETS, BlockRows, KVCacheSpec, block_geometry, make_kv_caches, merge_rows, plan_segments

DTYPES = ["bf16", "fp16", "fp32"] + (["fp8"] if hasattr(torch, "float8_e4m3fn") else [])
BLOCK_DIM = {"vllm": 1, "vllm_cpu": 0, "block_first": 0, "mla": 0, "cross_layer": 0}


def cache(layout, dtype="bf16", blocks=16, **kw):
    args = dict(num_layers=3, num_blocks=blocks, block_size=4, num_kv_heads=2, head_size=8, dtype=dtype)
    args.update(kw)
    return make_kv_caches(layout, **args)


def apply(segs, src_regions, dst_regions):
    for r, s, d, n in zip(segs.region, segs.src, segs.dst, segs.length):
        dst_regions[r][d:d + n] = src_regions[r][s:s + n]


def byte_regions(tensors):
    return [t.view(torch.uint8).reshape(-1).numpy() for t in tensors]


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(PRESETS), dtype=st.sampled_from(DTYPES), data=st.data())
def test_segments_copy_exactly_the_requested_blocks(layout, dtype, data):
    nb = 16
    n = data.draw(st.integers(0, nb))
    src = data.draw(st.lists(st.integers(0, nb - 1), min_size=n, max_size=n))
    dst = data.draw(st.permutations(range(nb)))[:n]
    pt, ps = cache(layout, dtype)
    dt, ds = cache(layout, dtype)
    g = torch.Generator().manual_seed(1)
    for t in pt + dt:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, generator=g))
    before = [t.view(torch.uint8).clone() for t in dt]
    segs = plan_segments(ps, ds, src, dst)
    # in range, positive, no two segments write the same destination bytes
    for r, spec in enumerate(ds.regions):
        m = segs.region == r
        assert np.all(segs.dst[m] + segs.length[m] <= spec.nbytes) and np.all(segs.length[m] > 0)
        order = np.argsort(segs.dst[m])
        ends, starts = (segs.dst[m] + segs.length[m])[order], segs.dst[m][order]
        assert np.all(ends[:-1] <= starts[1:])
    assert segs.nbytes == n * ps.bytes_per_block
    apply(segs, byte_regions(pt), byte_regions(dt))
    bd = BLOCK_DIM[layout]
    for b, p, d in zip(before, pt, dt):
        expect = b.clone()
        if n:
            expect.index_copy_(bd, torch.tensor(dst), p.view(torch.uint8).index_select(bd, torch.tensor(src)))
        assert torch.equal(d.view(torch.uint8), expect)


@pytest.mark.parametrize("layout", PRESETS)
def test_consecutive_blocks_cost_one_segment_per_region_and_span(layout):
    _, spec = cache(layout)
    segs = plan_segments(spec, spec, range(3, 11), range(5, 13))
    assert len(segs) == sum(len(r.spans) for r in spec.regions)
    scattered = plan_segments(spec, spec, [1, 5, 9], [2, 7, 11])
    assert len(scattered) == 3 * sum(len(r.spans) for r in spec.regions)


def test_cross_block_runs_merge_only_when_both_sides_are_contiguous():
    _, spec = cache("block_first")
    segs = plan_segments(spec, spec, [1, 2, 3, 8], [4, 5, 9, 10])
    assert sorted(segs.length.tolist()) == sorted([2 * spec.regions[0].block_stride, spec.regions[0].block_stride,
                                                   spec.regions[0].block_stride] * 3)


@pytest.mark.parametrize("bad, msg", [
    (dict(src=[1, 2], dst=[3]), "differ in length"),
    (dict(src=[16], dst=[0]), "source block id 16 out of range"),
    (dict(src=[0], dst=[-1]), "destination block id -1 out of range"),
    (dict(src=[1, 2], dst=[3, 3]), "duplicate destination block id 3"),
])
def test_bad_block_ids_are_refused_with_a_clear_message(bad, msg):
    _, spec = cache("vllm")
    with pytest.raises(ValueError, match=msg):
        plan_segments(spec, spec, bad["src"], bad["dst"])


@pytest.mark.parametrize("src, msg", [
    ([1.5], r"source block ids must be integers, got dtype float64"),
    (torch.tensor([1.0]), r"must be integers, got torch.float32"),
    (["1"], "must be integers"),
    ([None], "must be integers, got NoneType None"),
    ([True, False], "must be integers, got dtype bool.*not a mask"),
    ({1, 2}, "must be integers, got set"),
    ([[1], [2, 3]], "not a flat sequence of integers"),
    ([[1, 2], [3, 4]], r"one-dimensional, got shape \(2, 2\)"),
    ([2 ** 70], f"source block id {2 ** 70} out of range"),
    (np.array([2 ** 63 + 1], dtype=np.uint64), f"source block id {2 ** 63 + 1} out of range"),
])
def test_block_ids_that_are_not_integers_are_refused(src, msg):
    _, spec = cache("vllm")
    with pytest.raises(ValueError, match=msg):
        plan_segments(spec, spec, src, list(range(len(src))))


@pytest.mark.parametrize("ids", [np.array([7, 3, 9], dtype=np.int32), np.array([7, 3, 9], dtype=np.uint8),
                                 torch.tensor([7, 3, 9]), torch.tensor([7, 3, 9], dtype=torch.int32)])
def test_integer_arrays_and_tensors_of_ids_plan_like_lists(ids):
    _, spec = cache("vllm")
    want = plan_segments(spec, spec, [7, 3, 9], [2, 5, 6])
    got = plan_segments(spec, spec, ids, torch.tensor([2, 5, 6]))
    assert all(np.array_equal(getattr(got, f), getattr(want, f)) for f in ("region", "src", "dst", "length"))
    assert len(plan_segments(spec, spec, [], [])) == 0
    assert plan_segments(spec, spec, [4, 4], [1, 2]).nbytes == 2 * spec.bytes_per_block


def test_spec_mismatch_is_refused():
    _, a = cache("vllm", dtype="bf16")
    _, b = cache("vllm", dtype="fp16")
    with pytest.raises(ValueError, match="dtype"):
        plan_segments(a, b, [1], [1])
    _, c = cache("vllm", num_layers=4)
    with pytest.raises(ValueError, match="num_layers"):
        a.check_compatible(c)


def test_views_of_one_buffer_with_unusual_strides():
    # one buffer split per layer, with padding between layers, like engines that over-allocate
    L, N, B, H, D = 3, 10, 4, 2, 8
    per = 2 * N * B * H * D
    buf = torch.arange((per + 64) * L, dtype=torch.float32)
    layers = [buf[i * (per + 64): i * (per + 64) + per].view(2, N, B, H, D) for i in range(L)]
    spec = KVCacheSpec.from_tensors(layers, num_blocks=N)
    assert spec.regions[0].spans == ((0, B * H * D * 4), (N * B * H * D * 4, B * H * D * 4))
    # a view whose block dim is not the outermost in memory
    t = torch.zeros(B, N, H, D).permute(1, 0, 2, 3)  # logical [N, B, H, D], blocks strided by H*D
    s = KVCacheSpec.from_tensors([t], block_dim=0)
    assert len(s.regions[0].spans) == B and s.regions[0].spans[0][1] == H * D * 4


def test_vllm_cpu_engine_tensor_as_is():
    t = torch.zeros(12, 2, 32, 2 * 16, dtype=torch.bfloat16)  # [num_blocks, kv_heads, block_size, 2*head]
    s = KVCacheSpec.from_tensors([t, t.clone()], num_blocks=12)
    assert s.regions[0].spans == ((0, 2 * 32 * 32 * 2),) and s.num_blocks == 12


@pytest.mark.parametrize("make, msg", [
    (lambda: torch.zeros(4, 1, 6).expand(4, 8, 6), "overlap or interleave"),
    (lambda: torch.zeros(1, 8).expand(4, 8), "block stride 0"),
    (lambda: torch.zeros(4, 8).as_strided((4, 8), (2, 1)), "overlap"),
    (lambda: torch.zeros(8, 0), "is empty"),
    (lambda: torch.zeros(0, 4), "is empty"),
    (lambda: np.zeros((4, 8)), "is a ndarray, not a torch.Tensor"),
])
def test_unsupported_tensors_are_refused_with_the_reason(make, msg):
    with pytest.raises(ValueError, match=msg):
        KVCacheSpec.from_tensors([make()], block_dim=0)


def test_gapped_and_transposed_blocks_are_described_by_their_real_bytes():
    t = torch.zeros(4, 8, 6)[:, :, :3]
    s = KVCacheSpec.from_tensors([t], block_dim=0)
    assert s.regions[0].spans == tuple((i * 24, 12) for i in range(8))
    tt = torch.zeros(4, 8, 6).transpose(1, 2)
    assert KVCacheSpec.from_tensors([tt], block_dim=0).regions[0].spans == ((0, 192),)


def test_block_dim_must_be_findable():
    with pytest.raises(ValueError, match="block_dim"):
        KVCacheSpec.from_tensors([torch.zeros(4, 4)], num_blocks=4)
    with pytest.raises(ValueError, match="pass block_dim= or num_blocks="):
        KVCacheSpec.from_tensors([torch.zeros(4, 4)])


@pytest.mark.parametrize("block_dim", [2, -3, 1.0])
def test_block_dim_outside_the_tensor_is_refused(block_dim):
    with pytest.raises(ValueError, match=r"block_dim .* is not a dim of a 2-dim tensor"):
        KVCacheSpec.from_tensors([torch.zeros(8, 4)], block_dim=block_dim)


def test_spec_round_trips_through_a_dict():
    _, spec = cache("vllm_cpu")
    assert KVCacheSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="malformed"):
        KVCacheSpec.from_dict({"regions": "nope"})


def test_plan_32k_tokens_32_layers(benchmark):
    tensors = [torch.empty(2, 4096, 16, 8, 128, dtype=torch.bfloat16, device="meta") for _ in range(32)]
    spec = KVCacheSpec.from_tensors(tensors, block_dim=1, num_layers=32)
    rng = np.random.default_rng(0)
    src, dst = rng.choice(4096, 2048, replace=False), rng.choice(4096, 2048, replace=False)
    segs = benchmark(plan_segments, spec, spec, src, dst)
    assert segs.nbytes == 2048 * spec.bytes_per_block


def blocks_apply(src_spec, dst_spec, sb, db, src_regions, dst_regions):
    """Copy whole blocks the way the device block kernel does: from strides and pieces alone."""
    ss, ds, pieces = block_geometry(src_spec, dst_spec)
    for r, pc in enumerate(pieces):
        for s, d in zip(sb, db):
            for so, do, n in pc:
                dst_regions[r][d * ds[r] + do:d * ds[r] + do + n] = src_regions[r][s * ss[r] + so:s * ss[r] + so + n]


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(PRESETS), dtype=st.sampled_from(DTYPES), data=st.data())
def test_block_geometry_moves_the_same_bytes_as_the_segments(layout, dtype, data):
    nb = 12
    n = data.draw(st.integers(1, nb))
    src = data.draw(st.lists(st.integers(0, nb - 1), min_size=n, max_size=n))
    dst = data.draw(st.permutations(range(nb)))[:n]
    pt, ps = cache(layout, dtype, blocks=nb)
    g = torch.Generator().manual_seed(2)
    for t in pt:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, generator=g))
    a, ds = cache(layout, dtype, blocks=nb)
    b, _ = cache(layout, dtype, blocks=nb)
    for t in a + b:
        t.view(torch.uint8).fill_(0xA5)
    segs = plan_segments(ps, ds, src, dst)
    assert segs.plan is not None and list(segs.plan.src_blocks) == src and list(segs.plan.dst_blocks) == list(dst)
    assert segs.reversed().plan.src_blocks is segs.plan.dst_blocks
    apply(segs, byte_regions(pt), byte_regions(a))
    blocks_apply(ps, ds, src, dst, byte_regions(pt), byte_regions(b))
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def test_block_geometry_of_different_but_compatible_layouts():
    # P's cache is contiguous per block, D's has a gap after every token: pieces split at D's spans
    N, B, D = 6, 4, 8
    p = torch.arange(N * B * D, dtype=torch.float32).view(N, B, D)
    d = torch.zeros(N, B, D + 2)[:, :, :D]
    ps, ds = KVCacheSpec.from_tensors([p], block_dim=0), KVCacheSpec.from_tensors([d], block_dim=0)
    ss, dstr, pieces = block_geometry(ps, ds)
    assert len(pieces[0]) == B and ss[0] == B * D * 4 and dstr[0] == B * (D + 2) * 4
    segs = plan_segments(ps, ds, [0, 3], [5, 1])
    want = [np.zeros(d.untyped_storage().nbytes(), dtype=np.uint8) for _ in range(2)]
    src = [p.view(torch.uint8).reshape(-1).numpy()]
    apply(segs, src, want[:1])
    blocks_apply(ps, ds, [0, 3], [5, 1], src, want[1:])
    assert np.array_equal(want[0], want[1]) and want[0].any()


def test_a_plan_narrowed_to_some_regions_keeps_its_blocks():
    _, spec = cache("vllm")
    segs = plan_segments(spec, spec, [1, 4], [2, 9])
    one = segs.plan.only([2, 0])
    assert one.regions == (0, 2) and list(one.src_blocks) == [1, 4] and list(one.dst_blocks) == [2, 9]
    assert one.only([2, 1]).regions == (2,)
    back = one.reversed()
    assert back.regions == (0, 2) and list(back.src_blocks) == [2, 9] and back.src_spec is spec


def stream_apply(rows: BlockRows, sb, db, src_regions, dst_regions, regions=None):
    """Move bytes as a request by block ids does: the source rows read in order into one stream,
    poured in order into the destination rows (each side computed alone from its ids)."""
    sr, so, sl = rows.rows(np.asarray(sb), "src", regions)
    dr, do, dl = rows.rows(np.asarray(db), "dst", regions)
    stream = np.concatenate([src_regions[r][o:o + n] for r, o, n in zip(sr, so, sl)] or [np.zeros(0, np.uint8)])
    assert len(stream) == dl.sum() == rows.nbytes(len(sb), regions)
    pos = 0
    for r, o, n in zip(dr, do, dl):
        dst_regions[r][o:o + n] = stream[pos:pos + n]
        pos += n


@settings(max_examples=40, deadline=None)
@given(pair=st.sampled_from([(lay, lay) for lay in PRESETS] + [("vllm", "block_first"), ("block_first", "vllm")]),
       data=st.data())
def test_block_rows_move_the_same_bytes_as_the_segments(pair, data):
    nb = 10
    n = data.draw(st.integers(1, nb))
    src = data.draw(st.lists(st.integers(0, nb - 1), min_size=n, max_size=n))
    dst = data.draw(st.permutations(range(nb)))[:n]
    pt, ps = cache(pair[0], blocks=nb)
    g = torch.Generator().manual_seed(3)
    for t in pt:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, generator=g))
    a, ds = cache(pair[1], blocks=nb)
    b, _ = cache(pair[1], blocks=nb)
    for t in a + b:
        t.view(torch.uint8).fill_(0x5A)
    nreg = len(ps.regions)
    regions = data.draw(st.none() | st.lists(st.integers(0, nreg - 1), min_size=1, max_size=nreg, unique=True).map(sorted))
    segs = plan_segments(ps, ds, src, dst)
    if regions is not None:
        keep = np.isin(segs.region, regions)
        segs = type(segs)(segs.region[keep], segs.src[keep], segs.dst[keep], segs.length[keep])
    apply(segs, byte_regions(pt), byte_regions(a))
    rows = BlockRows(ps, ds)
    stream_apply(rows, src, dst, byte_regions(pt), byte_regions(b), regions)
    bases = np.arange(1, nreg + 1, dtype=np.uintp) << np.uintp(40)
    for side, ids in (("src", src), ("dst", dst)):
        r, o, n = rows.rows(np.asarray(ids), side, regions)
        want = [a + k for a, m in zip((bases[r] + o.astype(np.uintp)).tolist(), n.tolist()) for k in range(m)]
        for _ in range(2):  # the second call takes the cached per-region part
            iov = rows.iovecs(np.asarray(ids), side, None if regions is None else list(regions), bases)
            assert [a + k for a, m in iov.tolist() for k in range(m)] == want  # the same bytes, in order
            assert len(iov) <= len(r)
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def test_block_rows_refuse_ids_and_regions_outside_the_specs():
    _, spec = cache("vllm", blocks=8)
    rows = BlockRows(spec, spec)
    with pytest.raises(ValueError, match=r"source block id 8 out of range \[0, 8\)"):
        rows.check_ids(np.array([1, 8]), "src")
    with pytest.raises(ValueError, match="destination block id -1"):
        rows.check_ids(np.array([-1]), "dst")
    with pytest.raises(ValueError, match="outside the"):
        rows.check_regions([0, len(spec.regions)])
    rows.check_ids(np.array([0, 7]), "dst")


@pytest.mark.parametrize("layout", ["mla", "vllm", "block_first"])
def test_consecutive_block_ids_cost_one_iovec_row_per_region_and_piece(layout):
    _, spec = cache(layout, blocks=12)
    rows = BlockRows(spec, spec)
    bases = np.arange(1, len(spec.regions) + 1, dtype=np.uintp) << np.uintp(40)
    pieces = len(block_geometry(spec, spec)[2][0])
    assert len(rows.iovecs(np.array([3, 4, 5, 9]), "src", None, bases)) == 2 * pieces * len(spec.regions)
    assert len(rows.iovecs(np.array([5, 4]), "dst", None, bases)) == 2 * pieces * len(spec.regions)


def test_merge_rows_joins_only_rows_that_follow_each_other():
    iov = merge_rows(np.array([100, 110, 130, 140, 150], dtype=np.uintp), np.array([10, 10, 10, 10, 5], dtype=np.uintp))
    assert iov.tolist() == [[100, 20], [130, 25]]
