"""p2pkv.connector between tensor-parallel groups (pull): each D rank loads its heads from the P ranks
holding them, every P rank's hold ends once every D rank reading it released it (and those no D rank
reads are released too), and one failed P rank fails the whole load. Bytes are checked against the
full cache cut by plain tensor indexing (tests/tpcheck.py), never against the planner."""
from __future__ import annotations

import pytest
import torch

from p2pkv.connector import KVConnector
from tests.test_connector import reported, step, wait_finished
from tests.tpcheck import d_expected, make, p_shard

SRC, DST = [7, 3, 9, 10], [2, 5, 6, 0]


def group(cfg: dict, tp: int, role: str, backend: str = "loopback") -> list[tuple[KVConnector, list[torch.Tensor]]]:
    """`tp` connectors, one per rank: P's filled with their shard of the full cache, D's zeroed."""
    out = []
    for r in range(tp):
        tensors, spec = p_shard(cfg, tp, r) if role == "p" else make(cfg, tp, r)
        c = KVConnector(backend, mode="pull")
        c.register_kv_caches(tensors, spec)
        out.append((c, tensors))
    return out


def run(cfg: dict, p_tp: int, d_tp: int, backend: str = "loopback"):
    """Save on every P rank, load on every D rank; return both groups after every load ended."""
    ps, ds = group(cfg, p_tp, "p", backend), group(cfg, d_tp, "d", backend)
    conns = [c for c, _ in ps + ds]
    for c, _ in ps:
        c.save("req", SRC)
    addrs = [c.address for c, _ in ps]
    for c, _ in ds:
        c.load("req", DST, peer=addrs, remote_block_ids=SRC)
    for c, _ in ds:
        f = wait_finished(c, "req", also=tuple(conns))
        assert not f.failed, f.failed
    return ps, ds, conns


def close(conns: list[KVConnector]) -> None:
    for c in conns:
        c.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p_tp,d_tp,heads,layout", [(2, 1, 4, "vllm"), (1, 2, 4, "vllm_hnd"), (2, 4, 4, "vllm_cpu"),
                                                    (4, 2, 4, "block_first"), (4, 1, 2, "vllm"), (1, 4, 2, "vllm"),
                                                    (2, 2, 1, "mla"), (1, 2, 1, "mla")])
def test_each_d_rank_gets_its_heads_and_every_p_hold_ends_confirmed(p_tp, d_tp, heads, layout):
    cfg = {"layout": layout, "heads": heads}
    ps, ds, conns = run(cfg, p_tp, d_tp)
    try:
        for c, tensors in ds:
            before, _ = make(cfg, d_tp, c.spec.tp_rank)
            for got, want in zip(tensors, d_expected(cfg, before, c.spec.heads, SRC, DST)):
                assert torch.equal(got.view(torch.uint8), want)
        for c, _ in ps:
            wait_finished(c, "req", "saved", also=tuple(conns))
            assert c.stats().holds_ended == {"confirmed": 1} and c.holding() == {}
        for c, _ in ds:
            assert c.stats().counts["loaded_requests"] == 1 and c.stats().counts["loaded_blocks"] == len(DST)
    finally:
        close(conns)


@pytest.mark.timeout(60)
def test_a_p_rank_read_by_two_d_ranks_holds_until_both_released():
    cfg = {"layout": "vllm", "heads": 4}
    ps, ds = group(cfg, 1, "p"), group(cfg, 2, "d")
    (p, _), (d0, _), (d1, _) = ps[0], ds[0], ds[1]
    conns = [p, d0, d1]
    try:
        p.save("req", SRC)
        d0.load("req", DST, peer=[p.address], remote_block_ids=SRC)
        wait_finished(d0, "req", also=(p,))
        for _ in range(20):
            step(p)
        assert "req" not in reported(p).saved and p.holding() == {"req": SRC}
        d1.load("req", DST, peer=[p.address], remote_block_ids=SRC)
        wait_finished(d1, "req", also=(p,))
        wait_finished(p, "req", "saved", also=(d0, d1))
        assert p.stats().holds_ended == {"confirmed": 1}
    finally:
        close(conns)


@pytest.mark.timeout(60)
def test_discard_from_a_d_group_frees_every_p_rank():
    cfg = {"layout": "vllm", "heads": 2}
    ps, ds = group(cfg, 4, "p"), group(cfg, 2, "d")
    conns = [c for c, _ in ps + ds]
    try:
        for c, _ in ps:
            c.save("req", SRC)
        for c, _ in ds:
            c.discard([p.address for p, _ in ps], "req")
        for c, _ in ps:
            wait_finished(c, "req", "saved", also=tuple(conns))
            assert c.stats().holds_ended == {"aborted": 1}
    finally:
        close(conns)


@pytest.mark.timeout(60)
def test_one_unreachable_p_rank_fails_the_whole_load_with_every_block():
    cfg = {"layout": "vllm", "heads": 4}
    ps, ds = group(cfg, 2, "p", "tcp"), group(cfg, 1, "d", "tcp")
    (p0, _), (p1, _), (d, _) = ps[0], ps[1], ds[0]
    conns = [p0, d]
    try:
        p0.save("req", SRC)
        dead = p1.address
        p1.close()
        d.load("req", DST, peer=[p0.address, dead], remote_block_ids=SRC)
        f = wait_finished(d, "req", also=(p0,))
        failure = f.failed["req"]
        assert failure.blocks == tuple(sorted(DST)) and dead in failure.reason
        assert d.stats().load_failures == {"unreachable": 1}
        wait_finished(p0, "req", "saved", also=(d,))
    finally:
        close(conns)


@pytest.mark.timeout(60)
def test_tcp_p_group_of_two_to_d_group_of_two():
    cfg = {"layout": "vllm_cpu", "heads": 4, "dtype": "float16"}
    ps, ds, conns = run(cfg, 2, 2, "tcp")
    try:
        for c, tensors in ds:
            before, _ = make(cfg, 2, c.spec.tp_rank)
            for got, want in zip(tensors, d_expected(cfg, before, c.spec.heads, SRC, DST)):
                assert torch.equal(got.view(torch.uint8), want)
        for c, _ in ps:
            wait_finished(c, "req", "saved", also=tuple(conns))
    finally:
        close(conns)


def test_a_push_load_from_a_p_group_is_refused():
    cfg = {"layout": "vllm", "heads": 4}
    tensors, spec = make(cfg, 2, 0)
    with KVConnector("loopback", mode="push") as d:
        d.register_kv_caches(tensors, spec)
        with pytest.raises(ValueError, match="needs pull mode"):
            d.load("req", DST, peer=["127.0.0.1:1", "127.0.0.1:2"])
    with KVConnector("loopback") as d:
        d.register_kv_caches(tensors, spec)
        with pytest.raises(TypeError, match="addresses in rank order"):
            d.load("req", DST, peer=[], remote_block_ids=SRC)
