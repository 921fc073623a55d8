"""Independent checks of transferred KV blocks: plain tensor indexing along the block dim, never the segment planner."""
from __future__ import annotations

from typing import Sequence

import torch

BLOCK_DIM = {"vllm": 1, "vllm_cpu": 0, "block_first": 0, "mla": 0, "cross_layer": 0}


def expected_after(layout: str, dst_before: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                   src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[torch.Tensor]:
    """D's tensors as they must look after copying src_blocks of `src` into dst_blocks of D."""
    bd = BLOCK_DIM[layout]
    s = torch.as_tensor(list(src_blocks), dtype=torch.long)
    d = torch.as_tensor(list(dst_blocks), dtype=torch.long)
    out = []
    for before, p in zip(dst_before, src):
        e = before.view(torch.uint8).clone()
        if len(d):
            e.index_copy_(bd, d, p.view(torch.uint8).index_select(bd, s))
        out.append(e)
    return out


def assert_same(got: Sequence[torch.Tensor], expect: Sequence[torch.Tensor]) -> None:
    for i, (g, e) in enumerate(zip(got, expect)):
        g = g.view(torch.uint8)
        if not torch.equal(g, e):
            bad = (g != e).nonzero()
            raise AssertionError(f"tensor {i}: {len(bad)} bytes differ, first at index {bad[0].tolist()}")
