"""Byte segments: the one currency between the layout (which computes them) and
the transports (which move them). Four parallel int arrays, packed for the wire."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np

__all__ = ["Segments", "BlockPlan"]


@dataclass(frozen=True)
class BlockPlan:
    """Where a set of segments came from: these block ids of the source spec into those of the
    destination spec. A transport that copies whole blocks on the device (cuda_ipc) launches
    from this instead of the expanded segments: 64 segments per block become one table entry."""

    src_spec: Any
    dst_spec: Any
    src_blocks: np.ndarray
    dst_blocks: np.ndarray
    regions: tuple[int, ...] | None = None  # only these region indices (one layer's tensors); None: all

    def reversed(self) -> "BlockPlan":
        return BlockPlan(self.dst_spec, self.src_spec, self.dst_blocks, self.src_blocks, self.regions)

    def only(self, regions: Sequence[int]) -> "BlockPlan":
        """The same blocks in a subset of the regions (e.g. one layer of a layer-by-layer transfer)."""
        keep = tuple(sorted(int(r) for r in regions))
        if self.regions is not None:
            keep = tuple(r for r in keep if r in self.regions)
        return BlockPlan(self.src_spec, self.dst_spec, self.src_blocks, self.dst_blocks, keep)


@dataclass(frozen=True)
class Segments:
    """Copy `length[i]` bytes at `src[i]` of source region `region[i]` to `dst[i]`
    of the destination region with the same index."""

    region: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray
    plan: BlockPlan | None = field(default=None, compare=False, repr=False)

    @classmethod
    def empty(cls) -> "Segments":
        z = np.zeros(0, dtype=np.int64)
        return cls(np.zeros(0, dtype=np.int32), z, z, z)

    def __len__(self) -> int:
        return len(self.length)

    @staticmethod
    def check_given(segments: Any) -> None:
        """TypeError/ValueError unless `segments` is a Segments whose four arrays are 1-D integer arrays of one
        length (hand-made ones included), so a bad table is refused before it reaches a peer."""
        if not isinstance(segments, Segments):
            raise TypeError(f"segments must be a p2pkv Segments (from plan_segments), got {type(segments).__name__}")
        arrays = {"region": segments.region, "src": segments.src, "dst": segments.dst, "length": segments.length}
        for k, a in arrays.items():
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
                raise TypeError(f"Segments.{k} must be a 1-D numpy array of integers, got "
                                f"{getattr(a, 'dtype', type(a).__name__)} of shape {getattr(a, 'shape', '?')}")
        if len({len(a) for a in arrays.values()}) != 1:
            raise ValueError("Segments arrays differ in length: " + ", ".join(f"{k} {len(a)}" for k, a in arrays.items()))

    @cached_property
    def nbytes(self) -> int:
        return int(self.length.sum())

    def reversed(self) -> "Segments":
        """The same segments with source and destination swapped (a read seen from the other side)."""
        return Segments(self.region, self.dst, self.src, self.length,
                        self.plan.reversed() if self.plan is not None else None)

    def pack(self, side: str) -> bytes:
        """Region, offset and length of one side ('src' or 'dst') as little-endian int64 rows."""
        off = self.src if side == "src" else self.dst
        return np.stack([self.region.astype("<i8"), off.astype("<i8"), self.length.astype("<i8")], axis=1).tobytes()

    @staticmethod
    def unpack(raw: bytes, max_segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of `pack`: (region, offset, length) arrays; a ValueError if malformed."""
        if len(raw) % 24:
            raise ValueError(f"segment table of {len(raw)} bytes is not a whole number of 24-byte rows")
        n = len(raw) // 24
        if n > max_segments:
            raise ValueError(f"{n} segments exceed the limit of {max_segments}")
        a = np.frombuffer(raw, dtype="<i8").reshape(n, 3)
        return a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64)

    @staticmethod
    def check_bounds(region: np.ndarray, off: np.ndarray, length: np.ndarray, region_sizes: Sequence[int]) -> None:
        """Raise a ValueError unless every segment lies inside its region."""
        if len(region) == 0:
            return
        sizes = np.asarray(region_sizes, dtype=np.int64)
        if region.min() < 0 or region.max() >= len(sizes):
            raise ValueError(f"segment names region {int(region.max() if region.max() >= len(sizes) else region.min())}, "
                             f"but only {len(sizes)} are registered")
        if length.min() <= 0 or off.min() < 0:
            raise ValueError("segment with a negative offset or a non-positive length")
        end = off + length
        bad = np.flatnonzero(end > sizes[region])
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"segment [{int(off[i])}, {int(end[i])}) runs past the end of region {int(region[i])} "
                             f"({int(sizes[region[i]])} bytes)")
