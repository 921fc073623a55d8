"""A short soak (CI size): one P, three D processes, hundreds of verified transfers of random
sizes and layouts; no failures, open file descriptors flat, resident memory flat."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


@pytest.mark.timeout(240)
def test_short_soak_tcp(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--transfers", "900", "--ds", "3", "--warmup", "60",
                           "--json", str(out)], capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    assert s["transfers"] == 900 and s["failures"] == 0 and s["fds_flat"]
    assert s["max_rss_growth"] < 0.05
