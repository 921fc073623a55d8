"""Tensor parallelism across real processes on loopback: every P rank a process that registers its own
shard of a full KV cache with known contents; every D rank of another TP size reads its heads from the
P ranks `tp_plan` names, over tcp and nccl (gloo on CPU). Asserts byte-exact heads in the right blocks
of every D rank and every other block unchanged; GQA replication, MLA, NHD and HND included. In push
mode each P rank writes its heads into the D rank processes `tp_pushes` names."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from p2pkv.layout import plan_segments
from p2pkv.tp import tp_plan, tp_pushes
from p2pkv.transport import get_transport
from p2pkv.wire import HandshakeError
from tpcheck import d_expected, make, p_shard

HERE = Path(__file__).resolve().parent
CONFIGS = [
    {"layout": "vllm", "heads": 4},
    {"layout": "vllm_hnd", "heads": 4},
    {"layout": "vllm", "heads": 2, "seed": 1},  # GQA: at TP 4 each head lives on two ranks
    {"layout": "vllm_cpu", "heads": 4, "block_size": 8},
    {"layout": "block_first", "heads": 4, "dtype": "fp16"},
    {"layout": "cross_layer", "heads": 4, "layers": 3},
    {"layout": "mla", "heads": 1, "head_size": 24},  # one latent, the same on every rank
]
OPTIONS = {"tcp": {"timeout": 30}, "nccl": {"timeout": 30}}


class Group:
    """A TP group's ranks, one process each: `addrs[rank][config]`; `dump` reads a rank's bytes back."""

    def __init__(self, procs: list[subprocess.Popen], addrs: list[list[str]]):
        self.procs, self.addrs = procs, addrs

    def dump(self, rank: int, config: int, path: Path) -> bytes:
        p = self.procs[rank]
        p.stdin.write(f"dump {config} {path}\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        assert p.stdout.readline().strip() == "DUMPED"  # type: ignore[union-attr]
        return path.read_bytes()


@contextmanager
def group(role: str, backend: str, tp: int, configs: list[dict]) -> Iterator[Group]:
    """TP ranks of role 'p' or 'd' (tests/tp_roles.py), one process each; ends every process."""
    procs = [subprocess.Popen([sys.executable, str(HERE / "tp_roles.py"), role, backend, json.dumps(configs), str(tp),
                               str(r), json.dumps(OPTIONS[backend])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=HERE) for r in range(tp)]
    try:
        addrs = []
        for p in procs:
            lines = [p.stdout.readline().strip() for _ in configs]  # type: ignore[union-attr]
            if not all(line.startswith("ADDR ") for line in lines):
                raise RuntimeError(f"{role} rank failed to start: {lines!r}")
            addrs.append([line[5:] for line in lines])
        yield Group(procs, addrs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.close()  # type: ignore[union-attr]
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def read_into_d_group(backend: str, cfg: dict, addrs: list[str], p_tp: int, d_tp: int, seed: int) -> None:
    """D ranks 0..d_tp-1 each read one request's blocks from the P ranks their plan names, all at once."""
    nb = cfg.get("blocks", 12)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, nb))
    src, dst = rng.choice(nb, n, replace=False), rng.choice(nb, n, replace=False)
    with ExitStack() as stack:
        ranks = []
        for r in range(d_tp):
            tensors, spec = make(cfg, d_tp, r, fill="random", seed=seed * 10 + r)
            tr = stack.enter_context(get_transport(backend, **OPTIONS[backend]))
            tr.register(tensors, spec)
            handles = []
            for read in tp_plan(p_tp, spec):
                peer = tr.connect(addrs[read.p_rank])
                assert (peer.spec.tp_size, peer.spec.tp_rank) == (p_tp, read.p_rank)
                segs = plan_segments(peer.spec, spec, src, dst)
                handles.append(tr.read(peer, segs, request_id=f"tp{p_tp}->{d_tp} d{r} from p{read.p_rank}"))
            ranks.append((tensors, spec, [t.clone() for t in tensors], handles))
        for tensors, spec, before, handles in ranks:
            for h in handles:
                h.wait(30)
            for i, (got, want) in enumerate(zip(tensors, d_expected(cfg, before, spec.heads, src, dst))):
                same = torch.equal(got.view(torch.uint8), want)
                assert same, f"{cfg} P tp {p_tp} -> D rank {spec.tp_rank} of {d_tp}: tensor {i} differs"


def run_matrix(backend: str, p_tps: tuple[int, ...], d_tps: tuple[int, ...], configs: list[dict]) -> None:
    for p_tp in p_tps:
        with group("p", backend, p_tp, configs) as p:
            for ci, cfg in enumerate(configs):
                for d_tp in d_tps:
                    seed = 100 * p_tp + 10 * d_tp + ci
                    read_into_d_group(backend, cfg, [a[ci] for a in p.addrs], p_tp, d_tp, seed)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["tcp", "nccl"])
def test_p_tp_2_into_d_tp_1_and_4(backend):
    run_matrix(backend, (2,), (1, 4), [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[6]])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["tcp", "nccl"])
def test_every_p_tp_into_every_d_tp_on_every_layout(backend):
    run_matrix(backend, (1, 2, 4), (1, 2, 4), CONFIGS)


@pytest.mark.timeout(30)
def test_a_d_rank_dialling_a_p_rank_with_none_of_its_heads_is_refused_naming_tp_rank():
    cfg = CONFIGS[0]
    with get_transport("tcp") as p, get_transport("tcp") as d:
        p.register(*make(cfg, 2, 1))
        d.register(*make(cfg, 4, 0))
        with pytest.raises(HandshakeError, match=r"tp_rank: .*\[0, 1\) of 4 \(tp rank 0 of 4\).*no KV head in common"):
            d.connect(p.address)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p_tp, d_tp, ci, d_layout", [(2, 4, 0, "vllm"), (4, 1, 2, "vllm"), (1, 2, 0, "vllm_hnd")])
def test_push_each_p_rank_writes_its_heads_into_the_d_ranks_that_need_them(tmp_path, p_tp, d_tp, ci, d_layout):
    cfg = CONFIGS[ci]
    d_cfg = {**cfg, "layout": d_layout}  # NHD P into HND D: heads move one by one
    src, dst = [5, 0, 9, 3], [1, 11, 4, 8]
    with group("d", "tcp", d_tp, [d_cfg]) as d, ExitStack() as stack:
        handles = []
        for r in range(p_tp):
            tensors, spec = p_shard(cfg, p_tp, r)
            tr = stack.enter_context(get_transport("tcp", timeout=30))
            tr.register(tensors, spec)
            for push in tp_pushes(spec, d_tp):
                peer = tr.connect(d.addrs[push.d_rank][0])
                handles.append(tr.write(peer, plan_segments(spec, peer.spec, src, dst), f"p{r}->d{push.d_rank}"))
        for h in handles:
            h.wait(30)
        for r in range(d_tp):
            before, spec = make(d_cfg, d_tp, r, "random", seed=7 + r)
            got = torch.frombuffer(bytearray(d.dump(r, 0, tmp_path / f"d{r}.bin")), dtype=torch.uint8)
            want = torch.cat([e.contiguous().reshape(-1) for e in d_expected(cfg, before, spec.heads, src, dst)])
            assert torch.equal(got, want), f"D rank {r} of {d_tp} after pushes from P tp {p_tp}"
