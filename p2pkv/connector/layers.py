"""Which registered tensors hold which model layer, and what both sides derive from
that: one layer's share of a planned transfer, and per-block CRC32s of one layer."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

from p2pkv.layout import KVCacheSpec
from p2pkv.segments import Segments

__all__ = ["LayerMap"]


class LayerMap:
    """`groups[i]` lists the registered tensor indices that hold layer i."""

    def __init__(self, spec: KVCacheSpec, regions: Sequence[torch.Tensor],
                 groups: Sequence[Sequence[int]] | None = None):
        self.spec, self.regions = spec, regions
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(spec.regions))]
        if sorted(i for g in self.groups for i in g) != list(range(len(spec.regions))):
            raise ValueError(f"layers {self.groups} must name every registered tensor index exactly once")

    def __len__(self) -> int:
        return len(self.groups)

    def check(self, layer: int) -> int:
        if not 0 <= layer < len(self.groups):
            raise ValueError(f"layer {layer} out of range [0, {len(self.groups)})")
        return layer

    def block_bytes(self, layer: int) -> int:
        """Bytes one block holds in `layer` (across the tensors that hold it)."""
        return sum(self.spec.regions[r].bytes_per_block for r in self.groups[layer])

    def segments(self, full: Segments, layer: int) -> Segments:
        """The part of a planned transfer that moves `layer` (keeping its block-id plan)."""
        m = np.isin(full.region, self.groups[layer])
        plan = full.plan.only(self.groups[layer]) if full.plan is not None else None
        return Segments(full.region[m], full.src[m], full.dst[m], full.length[m], plan)

    def block_sums(self, blocks: np.ndarray, layer: int) -> list[int]:
        """CRC32 of each block's bytes in one layer, in the block's logical byte order."""
        sums = [0] * len(blocks)
        for r in self.groups[layer]:
            reg = self.spec.regions[r]
            flat = self.regions[r]
            if flat.device.type != "cpu":
                flat = flat.cpu()
            arr = flat.numpy()
            for i, b in enumerate(np.asarray(blocks).tolist()):
                for off, n in reg.spans:
                    start = b * reg.block_stride + off
                    sums[i] = zlib.crc32(arr[start:start + n], sums[i])
        return sums
