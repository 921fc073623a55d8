"""Plans between tensor-parallel groups: which P ranks a D rank reads, and which heads from each.

D rank r of `d_tp` holds `heads_of(H, d_tp, r)`; it reads each of those heads from one P rank that
holds it. Where several P ranks hold a head (fewer KV heads than P ranks, or MLA's latent on every
rank), the D ranks that need it are spread evenly over those P ranks, and equal TP sizes read rank to
rank. The bytes of one read are `plan_segments(p_spec, d_spec, ...)`: the heads both hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from p2pkv.heads import check_tp, heads_of
from p2pkv.layout import KVCacheSpec

__all__ = ["ShardRead", "tp_reads", "tp_plan", "tp_pushes"]


@dataclass(frozen=True)
class ShardRead:
    """D rank `d_rank` takes the model KV heads `heads` of every block of a request from P rank
    `p_rank` (an empty range: the whole latent, MLA)."""

    p_rank: int
    d_rank: int
    heads: range


def _p_rank_of(head: int, num_kv_heads: int, p_tp: int, d_tp: int, d_rank: int) -> int:
    """The P rank D rank `d_rank` reads `head` from (`num_kv_heads` 1 for a latent): its holder, or
    one of its replicas, the D ranks sharing the head spread evenly over them."""
    if p_tp <= num_kv_heads:
        return head // (num_kv_heads // p_tp)
    replicas = p_tp // num_kv_heads
    if d_tp > num_kv_heads:
        sharing, k = d_tp // num_kv_heads, d_rank % (d_tp // num_kv_heads)
        return head * replicas + (k * replicas // sharing if sharing <= replicas else k % replicas)
    return head * replicas + d_rank % replicas


def tp_reads(num_kv_heads: int, p_tp: int, d_tp: int) -> list[ShardRead]:
    """Every read between a P group of `p_tp` ranks and a D group of `d_tp` ranks, by D rank then P
    rank: each head of each D rank comes from exactly one P rank holding it (`num_kv_heads` is the
    model's; 0 for a latent, read whole from one P rank)."""
    check_tp(num_kv_heads, p_tp, 0)
    check_tp(num_kv_heads, d_tp, 0)
    reads: list[ShardRead] = []
    for r in range(d_tp):
        if num_kv_heads == 0:
            reads.append(ShardRead(_p_rank_of(0, 1, p_tp, d_tp, r), r, range(0)))
            continue
        for h in heads_of(num_kv_heads, d_tp, r):
            p = _p_rank_of(h, num_kv_heads, p_tp, d_tp, r)
            last = reads[-1] if reads else None
            if last is not None and last.d_rank == r and last.p_rank == p and last.heads.stop == h:
                reads[-1] = ShardRead(p, r, range(last.heads.start, h + 1))
            else:
                reads.append(ShardRead(p, r, range(h, h + 1)))
    return reads


def tp_plan(p: int | Sequence[KVCacheSpec], d: KVCacheSpec) -> list[ShardRead]:
    """The reads D rank `d.tp_rank` makes from a P group: `p` is P's TP size, or P's specs in rank
    order (as each P rank's handshake brought them), which are then checked against `d`."""
    specs = None if isinstance(p, int) else list(p)
    p_tp = p if specs is None else len(specs)
    if specs is not None:
        if not specs:
            raise ValueError("no P specs given: pass P's TP size or one spec per P rank")
        for i, s in enumerate(specs):
            if s.tp_size != p_tp or s.tp_rank != i:
                raise ValueError(f"P spec {i} is tp rank {s.tp_rank} of tp_size {s.tp_size}; pass one spec per "
                                 f"P rank, in rank order ({p_tp} given)")
    reads = [x for x in tp_reads(d.num_kv_heads, p_tp, d.tp_size) if x.d_rank == d.tp_rank]
    for x in reads if specs is not None else ():
        specs[x.p_rank].check_compatible(d)  # type: ignore[index]
    return reads


def tp_pushes(p: KVCacheSpec, d_tp: int) -> list[ShardRead]:
    """Push mode seen from P rank `p.tp_rank`: the D ranks it writes into (and the heads), the same
    assignment as the reads, so every head of every D rank is written once."""
    return [x for x in tp_reads(p.num_kv_heads, p.tp_size, d_tp) if x.p_rank == p.tp_rank]
