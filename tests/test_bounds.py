"""Segments outside the registered memory, for every socket-dialled backend that runs on CPU
here (tcp; ucx where ucxx is installed): a read naming bytes past the peer's regions is refused
by the serving side, a write naming bytes past the local ones is refused before anything is sent,
and the same pair then moves good requests."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from p2pkv.layout import make_kv_caches, plan_segments
from p2pkv.segments import Segments
from p2pkv.transport import TransferError, get_transport

BACKENDS = ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed (pip install 'p2pkv[ucx]')"))]


def _cache(**kw):
    args = dict(num_layers=2, num_blocks=24, block_size=4, num_kv_heads=2, head_size=8, dtype="bf16", fill="zeros")
    args.update(kw)
    return make_kv_caches("vllm", **args)


def _past_the_end(segs: Segments, nbytes: int, side: str) -> Segments:
    src, dst = (segs.src + nbytes, segs.dst) if side == "src" else (segs.src, segs.dst + nbytes)
    return Segments(segs.region, src, dst, segs.length)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_segments_are_refused_by_the_serving_side(backend):
    a, b = get_transport(backend), get_transport(backend)
    try:
        a.register(*_cache(fill="random", generator=torch.Generator().manual_seed(0)))
        b.register(*_cache())
        peer = b.connect(a.address)
        segs = plan_segments(a.spec, b.spec, [1], [1])
        with pytest.raises(TransferError, match="runs past the end"):
            b.read(peer, _past_the_end(segs, a.spec.regions[0].nbytes, "src"), "evil").wait(10)
        peer = b.connect(a.address)
        b.read(peer, segs, "good").wait(10)
        assert torch.equal(b.tensors[0][:, 1].view(torch.uint8), a.tensors[0][:, 1].view(torch.uint8))
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_of_segments_outside_the_local_regions_is_refused_before_sending(backend):
    a, b = get_transport(backend), get_transport(backend)
    try:
        a.register(*_cache())
        tb, sb = _cache(fill="random", generator=torch.Generator().manual_seed(4))
        b.register(tb, sb)
        peer = b.connect(a.address)
        segs = plan_segments(sb, a.spec, [1], [1])
        with pytest.raises(ValueError, match="runs past the end"):
            b.write(peer, _past_the_end(segs, sb.regions[0].nbytes, "src"), "evil")
        b.write(peer, segs, "good").wait(10)
        assert torch.equal(a.tensors[0][:, 1].view(torch.uint8), tb[0][:, 1].view(torch.uint8))
    finally:
        a.close()
        b.close()
