"""Tensor-parallel shards as layout math: which heads a rank holds, which P ranks a D rank reads,
and plans between shards of other TP sizes that put exactly D's heads into D's blocks, byte for byte,
on every preset layout (vLLM's NHD and HND, GQA replication and MLA's latent included)."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pkv import tp_plan
from p2pkv.heads import heads_of
from p2pkv.layout import BlockRows, KVCacheSpec, block_geometry, make_kv_caches, plan_segments
from p2pkv.tp import ShardRead, tp_pushes, tp_reads
from tpcheck import LAYOUTS, d_expected, make, p_shard, region_bytes

TPS = (1, 2, 4, 8)


@pytest.mark.parametrize("heads, tp, want", [
    (8, 1, [range(0, 8)]),
    (8, 2, [range(0, 4), range(4, 8)]),
    (8, 8, [range(i, i + 1) for i in range(8)]),
    (2, 4, [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]),  # GQA: each head on two ranks
    (1, 4, [range(0, 1)] * 4),
    (0, 4, [range(0)] * 4),  # MLA: a latent, whole on every rank
])
def test_heads_of_gives_each_rank_its_share(heads, tp, want):
    assert [heads_of(heads, tp, r) for r in range(tp)] == want


@pytest.mark.parametrize("heads, tp, rank, msg", [
    (6, 4, 0, "num_kv_heads 6 is not divisible by tp_size 4"),
    (4, 6, 0, "tp_size 6 is not a multiple of num_kv_heads 4"),
    (8, 2, 2, r"tp_rank 2 out of range \[0, 2\)"),
    (8, 0, 0, "tp_size must be at least 1"),
    (8, 2, -1, "tp_rank -1 out of range"),
    (8, 2.0, 0, "tp_size must be an int"),
    (-2, 1, 0, "num_kv_heads must not be negative"),
])
def test_bad_shards_are_refused_naming_the_field(heads, tp, rank, msg):
    with pytest.raises(ValueError, match=msg):
        heads_of(heads, tp, rank)
    if heads > 0:
        with pytest.raises(ValueError, match=msg):
            make_kv_caches("vllm", num_layers=1, num_blocks=4, block_size=4, num_kv_heads=heads, head_size=8,
                           tp_size=tp, tp_rank=rank)


def pairs(heads: int) -> list[tuple[int, int]]:
    ok = [t for t in TPS if heads == 0 or heads % t == 0 or t % heads == 0]
    return [(p, d) for p in ok for d in ok]


@pytest.mark.parametrize("heads", [0, 1, 2, 4, 8])
def test_every_head_of_every_d_rank_is_read_once_from_a_p_rank_holding_it(heads):
    for p_tp, d_tp in pairs(heads):
        reads = tp_reads(heads, p_tp, d_tp)
        for r in range(d_tp):
            mine = [x for x in reads if x.d_rank == r]
            if heads == 0:
                assert len(mine) == 1 and mine[0].heads == range(0)
                continue
            got = sorted(h for x in mine for h in x.heads)
            assert got == list(heads_of(heads, d_tp, r))
            for x in mine:
                assert set(x.heads) <= set(heads_of(heads, p_tp, x.p_rank))
        if p_tp == d_tp:
            assert [(x.p_rank, x.d_rank) for x in reads] == [(r, r) for r in range(d_tp)]  # rank to rank


@pytest.mark.parametrize("heads, p_tp, d_tp, p_ranks", [
    (2, 4, 4, [0, 1, 2, 3]),  # GQA replicas: each D rank its own P rank
    (2, 8, 4, [0, 2, 4, 6]),  # two D ranks per head, spread over that head's four P replicas
    (2, 4, 8, [0, 1, 0, 1, 2, 3, 2, 3]),
    (0, 4, 2, [0, 2]),  # MLA: read the latent from one rank, spread over P's ranks
    (0, 2, 4, [0, 1, 0, 1]),
])
def test_replicated_heads_are_read_from_one_p_rank_and_spread(heads, p_tp, d_tp, p_ranks):
    reads = tp_reads(heads, p_tp, d_tp)
    assert [x.p_rank for x in reads] == p_ranks and [x.d_rank for x in reads] == list(range(d_tp))
    _, p_spec = make({"layout": "mla" if heads == 0 else "vllm", "heads": heads or 1}, p_tp, p_ranks[0])
    assert all(x.p_rank == p_spec.tp_rank for x in tp_pushes(p_spec, d_tp))
    assert [x for x in reads if x.p_rank == p_spec.tp_rank] == tp_pushes(p_spec, d_tp)


def test_tp_plan_reads_like_the_layout_math():
    _, d = make({"layout": "vllm", "heads": 8}, 2, 1)
    assert tp_plan(4, d) == [ShardRead(2, 1, range(4, 6)), ShardRead(3, 1, range(6, 8))]
    p_specs = [make({"layout": "vllm", "heads": 8}, 4, r)[1] for r in range(4)]
    assert tp_plan(p_specs, d) == tp_plan(4, d)
    with pytest.raises(ValueError, match="P spec 0 is tp rank 1 of tp_size 4; pass one spec per P rank, in rank order"):
        tp_plan(p_specs[1:] + p_specs[:1], d)
    with pytest.raises(ValueError, match="P spec 0 is tp rank 0 of tp_size 4"):
        tp_plan(p_specs[:2], d)


def apply_segments(segs, src_bytes, dst_bytes) -> None:
    for r, s, d, n in zip(segs.region, segs.src, segs.dst, segs.length):
        dst_bytes[r][d:d + n] = src_bytes[r][s:s + n]


def apply_rows(rows: BlockRows, src, dst, src_bytes, dst_bytes) -> None:
    """As a request by block ids moves bytes: each side's rows alone, one stream between them."""
    sr, so, sl = rows.rows(np.asarray(src), "src")
    dr, do, dl = rows.rows(np.asarray(dst), "dst")
    stream = np.concatenate([src_bytes[r][o:o + n] for r, o, n in zip(sr, so, sl)])
    pos = 0
    for r, o, n in zip(dr, do, dl):
        dst_bytes[r][o:o + n] = stream[pos:pos + n]
        pos += n
    assert pos == len(stream)


def apply_blocks(p_spec, d_spec, src, dst, src_bytes, dst_bytes) -> None:
    """As the device block kernel does: strides and the pieces of one block."""
    ss, ds, pieces = block_geometry(p_spec, d_spec)
    for r, pc in enumerate(pieces):
        for s, d in zip(src, dst):
            for so, do, n in pc:
                dst_bytes[r][d * ds[r] + do:d * ds[r] + do + n] = src_bytes[r][s * ss[r] + so:s * ss[r] + so + n]


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), heads=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_shard_plans_put_exactly_each_d_ranks_heads_into_its_blocks(layout, heads, data):
    p_tp, d_tp = data.draw(st.sampled_from(pairs(heads)))
    cfg = {"layout": layout, "heads": heads, "dtype": data.draw(st.sampled_from(["bf16", "fp32"])), "seed": 3}
    nb = cfg["blocks"] = 8
    n = data.draw(st.integers(1, nb))
    src = data.draw(st.lists(st.integers(0, nb - 1), min_size=n, max_size=n))
    dst = data.draw(st.permutations(range(nb)))[:n]
    way = data.draw(st.sampled_from(["segments", "rows", "blocks"]))
    p = [p_shard(cfg, p_tp, r) for r in range(p_tp)]
    for r in range(d_tp):
        d_tensors, d_spec = make(cfg, d_tp, r, fill="random", seed=100 + r)
        before = [t.clone() for t in d_tensors]
        moved = 0
        dst_bytes = [region_bytes(t, g.nbytes) for t, g in zip(d_tensors, d_spec.regions)]
        for read in tp_plan([s for _, s in p], d_spec):
            p_tensors, p_spec = p[read.p_rank]
            src_bytes = [region_bytes(t, g.nbytes) for t, g in zip(p_tensors, p_spec.regions)]
            segs = plan_segments(p_spec, d_spec, src, dst)
            moved += segs.nbytes
            if way == "segments":
                apply_segments(segs, src_bytes, dst_bytes)
            elif way == "rows":
                apply_rows(BlockRows(p_spec, d_spec), src, dst, src_bytes, dst_bytes)
            else:
                apply_blocks(p_spec, d_spec, src, dst, src_bytes, dst_bytes)
        assert moved == n * d_spec.bytes_per_block  # every byte of D's blocks, once
        for got, want in zip(d_tensors, d_expected(cfg, before, d_spec.heads, src, dst)):
            assert torch.equal(got.view(torch.uint8), want)


@pytest.mark.parametrize("layout, pieces", [
    ("vllm", 2 * 4),  # NHD: a head slice is one span per token and K/V plane
    ("vllm_hnd", 2),  # HND: one span per K/V plane
    ("vllm_cpu", 1),
    ("block_first", 2 * 4),
    ("cross_layer", 3 * 2 * 4),
    ("mla", 1),
])
def test_a_head_slice_is_one_span_per_block_and_plane_only_where_heads_are_outermost(layout, pieces):
    cfg = {"layout": layout, "heads": 8, "layers": 3}
    _, full = make(cfg)
    _, quarter = make(cfg, 4, 1)
    got = block_geometry(full, quarter)[2]
    assert all(len(pc) == pieces for pc in got)
    assert sum(int(pc[:, 2].sum()) for pc in got) == quarter.bytes_per_block
    if layout != "mla":  # P's other heads lie between one block's slice and the next: no run merges
        assert len(plan_segments(full, quarter, range(2, 10), range(0, 8))) == 8 * pieces * len(got)


@pytest.mark.parametrize("d_tp", [1, 2, 4])
def test_nhd_and_hnd_trade_heads_one_by_one(d_tp):
    cfg = {"layout": "vllm", "heads": 4, "blocks": 6, "seed": 9}
    p_tensors, p_spec = p_shard(cfg, 1, 0)
    d_cfg = {**cfg, "layout": "vllm_hnd"}
    for r in range(d_tp):
        d_tensors, d_spec = make(d_cfg, d_tp, r, fill="random", seed=r)
        before = [t.clone() for t in d_tensors]
        apply_segments(plan_segments(p_spec, d_spec, [4, 0, 1], [1, 2, 5]),
                       [region_bytes(t, g.nbytes) for t, g in zip(p_tensors, p_spec.regions)],
                       [region_bytes(t, g.nbytes) for t, g in zip(d_tensors, d_spec.regions)])
        for got, want in zip(d_tensors, d_expected(cfg, before, d_spec.heads, [4, 0, 1], [1, 2, 5])):  # P's contents
            assert torch.equal(got.view(torch.uint8), want)


def test_layouts_whose_heads_hold_other_dims_are_refused_naming_the_byte_order():
    _, p = make({"layout": "vllm", "heads": 4})
    for tp in (1, 2):
        with pytest.raises(ValueError, match="byte order of one head of tensor 0"):
            p.check_compatible(make({"layout": "vllm_cpu", "heads": 4}, tp, 0)[1])


def test_check_compatible_accepts_other_tp_sizes_and_names_what_cannot_work():
    cfg = {"layout": "vllm", "heads": 8}
    _, p = make(cfg, 2, 0)
    make(cfg, 4, 1)[1].check_compatible(p)
    make(cfg, 1, 0)[1].check_compatible(p)
    with pytest.raises(ValueError, match="num_kv_heads: local 8 vs peer 4"):
        p.check_compatible(make({**cfg, "heads": 4}, 2, 0)[1])
    with pytest.raises(ValueError, match=r"tp_rank: local holds KV heads \[0, 4\) of 8 \(tp rank 0 of 2\), peer "
                                         r"KV heads \[6, 8\) of 8 \(tp rank 3 of 4\): no KV head in common"):
        p.check_compatible(make(cfg, 4, 3)[1])
    with pytest.raises(ValueError, match="head_size"):
        p.check_compatible(make({**cfg, "head_size": 16}, 4, 0)[1])
    with pytest.raises(ValueError, match="num_kv_heads: local holds"):
        p.check_compatible(KVCacheSpec.from_dict({**make(cfg, 2, 0)[1].to_dict(), "num_kv_heads": 0}))


def test_a_shard_without_a_named_head_dim_is_refused_when_heads_must_be_sliced():
    t = torch.zeros(2, 6, 4, 2, 8)  # rank 0 of 2 holding 2 of 4 heads, dims not named
    spec = KVCacheSpec.from_tensors([t], block_dim=1, num_kv_heads=4, tp_size=2, tp_rank=0)
    spec.check_compatible(KVCacheSpec.from_tensors([t.clone()], block_dim=1, num_kv_heads=4, tp_size=2, tp_rank=0))
    _, whole = make({"layout": "vllm", "heads": 4, "blocks": 6, "dtype": "fp32", "layers": 1})
    with pytest.raises(ValueError, match="no dim is named 'head'.*pass dim_names="):
        whole.check_compatible(spec)
    with pytest.raises(ValueError, match=r"2 heads in its 'head' dim, but this rank holds 1: KV heads \[0, 1\) of 4"):
        KVCacheSpec.from_tensors([t], block_dim=1, dim_names=("kv", "block", "token", "head", "dim"), num_kv_heads=4,
                                 tp_size=4, tp_rank=0)


def test_shard_spec_round_trips_through_msgpack():
    _, spec = make({"layout": "vllm_hnd", "heads": 2}, 4, 3)
    back = KVCacheSpec.from_dict(msgpack.unpackb(msgpack.packb(spec.to_dict()), raw=False))
    assert back == spec and back.heads == range(1, 2) and back.tp_size == 4
    _, whole = make({"layout": "vllm", "heads": 2})
    old = {k: v for k, v in whole.to_dict().items() if k not in ("tp_size", "tp_rank")}
    assert KVCacheSpec.from_dict(old) == whole  # a peer that sends no shard holds every head
    with pytest.raises(ValueError, match="malformed KV cache spec.*tp_rank 4 out of range"):
        KVCacheSpec.from_dict({**spec.to_dict(), "tp_rank": 4})


def test_hnd_is_vllms_shape_with_heads_outside_tokens():
    tensors, spec = make({"layout": "vllm_hnd", "heads": 4, "blocks": 6})
    assert tensors[0].shape == (2, 6, 4, 4, 8) and spec.layout == "vllm_hnd"
    assert [c[0] for c in spec.regions[0].content] == ["kv", "head", "token", "dim"]
    with pytest.raises(ValueError, match="kv_layout 'HND'"):
        make_kv_caches("block_first", num_layers=1, num_blocks=4, block_size=4, num_kv_heads=2, head_size=8,
                       kv_layout="HND")


def test_shards_without_the_models_head_count_say_what_is_missing():
    t2, t4 = torch.zeros(4, 2, 4, 8), torch.zeros(4, 4, 4, 8)  # [N, H, B, D], heads of TP 2 and TP 1
    a = KVCacheSpec.from_tensors([t2], block_dim=0, tp_size=2, tp_rank=1)
    b = KVCacheSpec.from_tensors([t4], block_dim=0)
    with pytest.raises(ValueError, match="bytes per block of tensor 0: local 256 vs peer 512; shards of other TP "
                                         "sizes need num_kv_heads"):
        a.check_compatible(b)
