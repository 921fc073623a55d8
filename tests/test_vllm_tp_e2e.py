"""Real vLLM (CPU) with tensor parallelism through P2pKvConnector, pull mode: P at TP 2 → D at TP 2,
P at TP 2 → D at TP 1 and P at TP 1 → D at TP 2. Every worker registers its own shard; each D worker
reads its heads from the P workers holding them. D's greedy tokens must equal a plain TP=1 run's, D's
prompt tokens must come from P (vLLM counts them as not computed by D), and every P rank's holds must
end confirmed. On a host of two cores each TP=2 instance binds its workers to cores 0 and 1, and at
most two instances run at once (P and D of the pair under test)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from test_vllm_e2e import MAX_TOKENS, Role, check_d, for_d, read_metrics, wait_metrics  # noqa: E402
from tiny_llama import prompts as make_prompts  # noqa: E402
from tiny_llama import write_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("P2PKV_TP_E2E"), reason=(
                  "set P2PKV_TP_E2E=1: on a 2-core host two TP=2 vLLM instances starve whole worker processes "
                  "for tens of seconds (passed 5 of 10 runs; docs/tp.md), so it is not in CI yet"))]

LENGTHS = [40, 75, 100, 130]
BIND = {1: "0", 2: "0|1"}
PAIRS = [(2, 2), (2, 1), (1, 2)]


# Two TP=2 instances on two cores oversubscribe them: a worker was seen getting a step 26 s after its
# peer rank, and pausing 85 s inside one start_load_kv; transfers wait for the engines, not the reverse.
TIMEOUT_S = "400"


def start(name: str, role: str, model: str, tp: int, root: str) -> Role:
    return Role(name, [role, model, "--mode", "pull", "--tp", str(tp), "--metrics", f"{root}/{name}.json",
                       "--load-timeout", TIMEOUT_S, "--hold-timeout", TIMEOUT_S],
                root, env={"VLLM_CPU_OMP_THREADS_BIND": BIND[tp], "P2PKV_IO_CPUS": "0,1"})


def metrics_files(path: str, tp: int) -> list[str]:
    return [path] if tp == 1 else [path.replace(".json", f".tp{r}.json") for r in range(tp)]


@pytest.mark.timeout(1800)
def test_tp_pairs_match_plain_tokens_and_release_every_hold(tmp_path):
    root = str(tmp_path)
    model = write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    batches = {pair: make_prompts(4, LENGTHS, seed=10 + i) for i, pair in enumerate(PAIRS)}
    plain = Role("plain", ["plain", model], root)
    try:
        plain.next()
        expected = {}
        for pair, ps in batches.items():
            plain.send(ps, None, MAX_TOKENS)
            expected[pair] = plain.next()["tokens"]
    finally:
        plain.kill()

    running: dict[str, Role] = {}
    served: dict[str, int] = {}  # requests each P instance has handed to a D so far
    try:
        for p_tp, d_tp in PAIRS:
            p_name, d_name = f"p_tp{p_tp}", f"d_tp{d_tp}_from_p_tp{p_tp}"
            for name in [n for n in running if n not in (p_name, d_name)]:
                running.pop(name).kill()
            new = [n for n in (p_name, d_name) if n not in running]
            for name in new:
                running[name] = start(name, "producer" if name.startswith("p") else "consumer", model,
                                      p_tp if name == p_name else d_tp, root)
            for name in new:
                running[name].next(600)
            p, d, prompts = running[p_name], running[d_name], batches[p_tp, d_tp]
            p.send(prompts, [{"do_remote_decode": True}] * len(prompts), 1)
            params = p.next()["kv_transfer_params"]
            for x in params:
                assert x["do_remote_prefill"] and x["remote_block_ids"]
                assert x.get("remote_tp_size", 1) == p_tp and len(x.get("remote_addresses", [0])) == p_tp
            d.send(prompts, for_d(params), MAX_TOKENS)
            check_d(d.next(), expected[p_tp, d_tp], loaded=True)
            served[p_name] = served.get(p_name, 0) + len(prompts)
            # Every rank of P released every hold, confirmed by every D rank that read it.
            for path in metrics_files(f"{root}/{p_name}.json", p_tp):
                n = served[p_name]
                m = wait_metrics(path, lambda m, n=n: m.get("holds_ended", {}).get("confirmed") == n, float(TIMEOUT_S))
                assert m["holds_ended"] == {"confirmed": n} and m["held"] == 0, (path, m)
            for path in metrics_files(f"{root}/{d_name}.json", d_tp):
                m = read_metrics(path)
                assert m.get("loaded_requests") == len(prompts) and not m.get("load_failures"), (path, m)
    finally:
        for r in running.values():
            r.kill()
