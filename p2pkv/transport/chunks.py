"""How the nccl backend cuts a transfer into messages: segments long enough go as views of
the registered memory, the rest are packed into chunks (`plan_chunks`), and `Packer` copies
a chunk's segments between the KV memory and a contiguous buffer (CPU: one C call per run of
one region, GIL released; CUDA: one kernel launch)."""
from __future__ import annotations

import numpy as np
import torch

from p2pkv import kernels

__all__ = ["Packer", "plan_chunks"]


def plan_chunks(length: np.ndarray, pack_threshold: int, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split segment indices into `direct` ones (length >= `pack_threshold`, sent as views
    of the registered memory) and `packed` ones, cut into chunks of at most `chunk_bytes`
    (a lone segment may exceed it): chunk j packs `packed[bounds[j]:bounds[j + 1]]`.
    Both sides call this on the same lengths and settings, so they cut the same messages."""
    length = np.asarray(length, dtype=np.int64)
    big = length >= pack_threshold
    direct, packed = np.flatnonzero(big), np.flatnonzero(~big)
    sizes = length[packed]
    if len(packed) and sizes[0] == sizes[-1] and np.all(sizes == sizes[0]):
        # Equal segments (an engine's blocks): the greedy cut below, without its Python loop per chunk.
        per = max(1, chunk_bytes // int(sizes[0]))
        return direct, packed, np.append(np.arange(0, len(packed), per, dtype=np.int64), len(packed))
    bounds = [0]
    if len(packed):
        ends = np.cumsum(sizes)
        start, base = 0, 0
        while start < len(packed):
            stop = max(int(np.searchsorted(ends, base + chunk_bytes, side="right")), start + 1)
            bounds.append(stop)
            base, start = int(ends[stop - 1]), stop
    return direct, packed, np.asarray(bounds, dtype=np.int64)


class Packer:
    """Copies the packed segments of one transfer between the registered memory and chunk buffers.

    On CPU the segments are cut into units of g bytes (the gcd of their offsets and lengths)
    and every same-region run moves with one call in C with the GIL released (torch's
    index_select or numpy's take to pack, a numpy put to unpack). A Python loop per segment
    would hold the GIL and stall the threads that send. CUDA uses p2pkv.kernels (one launch per chunk).
    """

    MIN_UNIT = 256

    def __init__(self, regions: list[torch.Tensor], region: np.ndarray, off: np.ndarray, length: np.ndarray,
                 packed: np.ndarray, bounds: np.ndarray):
        self.regions, self.bounds = regions, bounds
        self.reg = region[packed].astype(np.int64)
        self.off, self.len = off[packed].astype(np.int64), length[packed].astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(self.len)])
        self.sizes = (cum[bounds[1:]] - cum[bounds[:-1]]).tolist()
        self.g = 0
        if len(packed) and regions[0].device.type == "cpu":
            g = int(np.gcd.reduce(np.concatenate([self.off, self.len])))
            if g >= self.MIN_UNIT:
                k = self.len // g
                self.ucum = np.concatenate([[0], np.cumsum(k)])
                self.units = np.repeat(self.off // g - self.ucum[:-1], k) + np.arange(self.ucum[-1], dtype=np.int64)
                self.void = np.dtype((np.void, g))
                self.g = g
        self._rv: dict[int, np.ndarray] = {}
        self._rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sizes)

    def _runs(self, j: int) -> list[tuple[int, int]]:
        a, b = int(self.bounds[j]), int(self.bounds[j + 1])
        cuts = (a + 1 + np.flatnonzero(self.reg[a + 1:b] != self.reg[a:b - 1])).tolist()
        edges = [a, *cuts, b]
        return list(zip(edges[:-1], edges[1:]))

    def _region_units(self, r: int) -> np.ndarray:
        if r not in self._rv:
            flat = self.regions[r].numpy()
            self._rv[r] = flat[:len(flat) // self.g * self.g].view(self.void)
        return self._rv[r]

    def _triples(self, j: int) -> zip:
        a, b = int(self.bounds[j]), int(self.bounds[j + 1])
        return zip(self.reg[a:b].tolist(), self.off[a:b].tolist(), self.len[a:b].tolist())

    def _region_rows(self, r: int) -> torch.Tensor:
        if r not in self._rows:
            flat = self.regions[r]
            self._rows[r] = flat[:flat.numel() // self.g * self.g].view(-1, self.g)
        return self._rows[r]

    def gather(self, j: int, buf: torch.Tensor) -> int:
        """Pack chunk j into the front of `buf`; returns its byte count.

        torch's index_select copies rows with plain memcpy, about 1.5x numpy's take here, but
        with more than one intra-op thread it hands work to an OpenMP pool whose spinning starves
        gloo's threads; so it is used only where torch runs single-threaded (torchrun's default)."""
        n = self.sizes[j]
        if self.g:
            base = self.ucum[self.bounds[j]]
            if torch.get_num_threads() == 1:
                rows = buf[:n].view(-1, self.g)
                for s, e in self._runs(j):
                    u0, u1 = self.ucum[s] - base, self.ucum[e] - base
                    torch.index_select(self._region_rows(int(self.reg[s])), 0,
                                       torch.from_numpy(self.units[self.ucum[s]:self.ucum[e]]), out=rows[u0:u1])
                return n
            out = buf[:n].numpy().view(self.void)
            for s, e in self._runs(j):
                u0, u1 = self.ucum[s] - base, self.ucum[e] - base
                np.take(self._region_units(int(self.reg[s])), self.units[self.ucum[s]:self.ucum[e]],
                        out=out[u0:u1], mode="clip")
        elif buf.device.type == "cpu":
            out, pos = memoryview(buf.numpy()), 0
            mvs = [memoryview(r.numpy()) for r in self.regions]
            for r, o, k in self._triples(j):
                out[pos:pos + k] = mvs[r][o:o + k]
                pos += k
        else:
            a, b = int(self.bounds[j]), int(self.bounds[j + 1])
            kernels.gather(self.regions, self.reg[a:b], self.off[a:b], self.len[a:b], out=buf)
        return n

    def scatter(self, j: int, buf: torch.Tensor) -> None:
        """Unpack chunk j from the front of `buf` into its segments."""
        n = self.sizes[j]
        if self.g:
            src = buf[:n].numpy().view(self.void)
            base = self.ucum[self.bounds[j]]
            for s, e in self._runs(j):
                u0, u1 = self.ucum[s] - base, self.ucum[e] - base
                self._region_units(int(self.reg[s]))[self.units[self.ucum[s]:self.ucum[e]]] = src[u0:u1]
        elif buf.device.type == "cpu":
            src, pos = memoryview(buf.numpy()), 0
            mvs = [memoryview(r.numpy()) for r in self.regions]
            for r, o, k in self._triples(j):
                mvs[r][o:o + k] = src[pos:pos + k]
                pos += k
        else:
            a, b = int(self.bounds[j]), int(self.bounds[j + 1])
            kernels.scatter(buf, self.regions, self.reg[a:b], self.off[a:b], self.len[a:b])
