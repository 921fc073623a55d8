"""Tensor-parallel test caches: a model's full cache with seeded contents, each rank's shard of it cut
by plain tensor indexing on the head dim, and what a D rank must hold after reading (never the planner)."""
from __future__ import annotations

from typing import Sequence

import torch

from p2pkv.layout import make_kv_caches

# dims of the tensors as make_kv_caches shapes them (HND keeps vLLM's logical [2, N, B, H, D])
BLOCK_DIM = {"vllm": 1, "vllm_hnd": 1, "vllm_cpu": 0, "block_first": 0, "mla": 0, "cross_layer": 0}
HEAD_DIM = {"vllm": 3, "vllm_hnd": 3, "vllm_cpu": 1, "block_first": 3, "mla": None, "cross_layer": 4}
LAYOUTS = tuple(BLOCK_DIM)


def make(cfg: dict, tp_size: int = 1, tp_rank: int = 0, fill: str = "zeros", seed: int | None = None):
    """A rank's cache for a config {layout, heads, ...}: 'vllm_hnd' is the vllm layout with kv_layout HND."""
    lay = cfg["layout"]
    g = torch.Generator().manual_seed(cfg.get("seed", 0) if seed is None else seed)
    return make_kv_caches("vllm" if lay == "vllm_hnd" else lay, num_layers=cfg.get("layers", 2),
                          num_blocks=cfg.get("blocks", 12), block_size=cfg.get("block_size", 4),
                          num_kv_heads=cfg.get("heads", 4), head_size=cfg.get("head_size", 8),
                          dtype=cfg.get("dtype", "bf16"), kv_layout="HND" if lay == "vllm_hnd" else "NHD",
                          fill=fill, generator=g, tp_size=tp_size, tp_rank=tp_rank)


def heads_part(layout: str, tensors: Sequence[torch.Tensor], heads: Sequence[int]) -> list[torch.Tensor]:
    """These heads of each tensor (all of it for a latent), as bytes."""
    hd = HEAD_DIM[layout]
    if hd is None:
        return [t.view(torch.uint8) for t in tensors]
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    return [t.view(torch.uint8).index_select(hd, idx) for t in tensors]


def p_shard(cfg: dict, tp_size: int, tp_rank: int):
    """P rank `tp_rank`'s tensors and spec, filled with its heads of the full cache."""
    full, _ = make(cfg, fill="random")
    tensors, spec = make(cfg, tp_size, tp_rank)
    for t, part in zip(tensors, heads_part(cfg["layout"], full, spec.heads)):
        t.view(torch.uint8).copy_(part)
    return tensors, spec


def d_expected(cfg: dict, before: Sequence[torch.Tensor], heads: Sequence[int], src: Sequence[int],
               dst: Sequence[int]) -> list[torch.Tensor]:
    """D's tensors (bytes) after its `dst` blocks received `heads` of the full cache's `src` blocks."""
    full, _ = make(cfg, fill="random")
    bd = BLOCK_DIM[cfg["layout"]]
    s, d = torch.as_tensor(list(src), dtype=torch.long), torch.as_tensor(list(dst), dtype=torch.long)
    out = []
    for b, f in zip(before, heads_part(cfg["layout"], full, heads)):
        e = b.view(torch.uint8).clone()
        e.index_copy_(bd, d, f.index_select(bd, s))
        out.append(e)
    return out


def region_bytes(t: torch.Tensor, nbytes: int):
    """A numpy byte view of a region as the layout addresses it: from the tensor's first byte, `nbytes` long."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), t.storage_offset() * t.element_size(),
                                                  (nbytes,), (1,)).numpy()
