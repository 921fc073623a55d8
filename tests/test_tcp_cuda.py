"""tcp on CUDA tensors (GPU machine only): pinned staging with the gather/scatter
kernels, two processes, pull and push byte-exact, across several staging chunks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pkv.layout import plan_segments
from p2pkv.transport import get_transport

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cuda_ipc_peer import build  # noqa: E402
from test_cuda_ipc import ask, expected, peer  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
OPTS = {"staging_bytes": 1 << 16}  # 64 KiB: every request spans many staging chunks


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["vllm", "cross_layer"])
def test_tcp_cuda_pull_and_push(layout, tmp_path):
    cfg = {"backend": "tcp", "options": OPTS, "layout": layout, "dtype": "bf16", "seed": 5, "blocks": 48}
    with peer(cfg) as (proc, addr):
        p_t, _ = build(cfg)
        d_t, d_spec = build({**cfg, "seed": 9})
        before = [t.clone() for t in d_t]
        tr = get_transport("tcp", **OPTS)
        try:
            tr.register(d_t, d_spec)
            pr = tr.connect(addr)
            rng = np.random.default_rng(1)
            sb, db = rng.choice(48, 40, replace=False), rng.choice(48, 40, replace=False)
            tr.read(pr, plan_segments(pr.spec, d_spec, sb, db), request_id="pull").wait(30)
            torch.cuda.synchronize()
            for got, exp in zip(d_t, expected(p_t, before, layout, sb, db)):
                assert torch.equal(got.view(torch.uint8), exp)
            # push D's (now partly P's) blocks back into other P blocks
            sb2, db2 = rng.choice(48, 20, replace=False), rng.choice(48, 20, replace=False)
            tr.write(pr, plan_segments(d_spec, pr.spec, sb2, db2), request_id="push", notify={"r": "push"}).wait(30)
            assert ask(proc, f"dump {tmp_path / 'p.bin'}") == "DUMPED"
            got = np.frombuffer((tmp_path / "p.bin").read_bytes(), dtype=np.uint8)
            want = torch.cat([e.reshape(-1) for e in expected(d_t, p_t, layout, sb2, db2)]).cpu().numpy()
            assert np.array_equal(got, want)
            assert json.loads(ask(proc, "notif")[6:]) == {"r": "push"}
        finally:
            tr.close()
