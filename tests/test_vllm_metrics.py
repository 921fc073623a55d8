"""The vLLM adapter's metrics without an engine: P2pKvStats as vLLM aggregates and reduces
it, its Prometheus series registered and observed in a fresh registry, and a worker half
over the loopback transport whose stats count a real load."""
from __future__ import annotations

import time
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")
prom = pytest.importorskip("prometheus_client")

from p2pkv.connector import ConnectorStats  # noqa: E402
from p2pkv.integrations.vllm import P2pKvConnector, P2pKvStats, Settings  # noqa: E402
from p2pkv.integrations.vllm.specs import LoadSpec, P2pKvMetadata, SaveSpec  # noqa: E402
from p2pkv.integrations.vllm.worker import P2pKvWorker  # noqa: E402


def stats(counts=None, failures=None, ends=None, held=0, worker="w0", loads=(), holds=()) -> P2pKvStats:
    s = P2pKvStats()
    s.add(ConnectorStats(counts or {}, failures or {}, ends or {}, held), worker)
    for x in loads:
        s.observe_load(x)
    for x in holds:
        s.observe_hold(x)
    return s


def test_stats_sum_counts_concatenate_timings_and_keep_each_workers_latest_holds():
    a = stats({"loaded_bytes": 100, "loaded_blocks": 2}, {"timeout": 1}, {"confirmed": 1}, held=3, loads=[0.01])
    b = stats({"loaded_bytes": 50, "sent_blocks": 4}, {"timeout": 2, "gone": 1}, {"expired": 1}, held=1,
              worker="w1", loads=[0.03])
    later = stats(held=0, worker="w0")
    s = P2pKvConnector.build_kv_connector_stats(a.to_dict())
    s = s.aggregate(b).aggregate(later).aggregate(P2pKvStats())
    d = s.to_dict()
    assert d["counts"] == {"loaded_bytes": 150, "loaded_blocks": 2, "sent_blocks": 4}
    assert d["load_failures"] == {"timeout": 3, "gone": 1}
    assert d["holds_ended"] == {"confirmed": 1, "expired": 1}
    assert d["load_seconds"] == [0.01, 0.03] and d["held"] == {"w0": 0, "w1": 1}
    r = s.reduce()
    assert r["Loaded blocks"] == 2 and r["Sent blocks"] == 4 and r["Failed loads"] == 4
    assert r["Failed loads (timeout)"] == 3 and r["Holds kept"] == 1 and r["Holds expired"] == 1
    assert r["Avg load ms"] == pytest.approx(20.0)


def test_empty_stats_are_empty_and_reduce_to_zeros():
    s = P2pKvConnector.build_kv_connector_stats()
    assert s.is_empty() and s.reduce()["Loads"] == 0 and s.reduce()["Avg load ms"] == 0
    assert not stats(held=0).is_empty()  # a worker's holds going to 0 is news
    s.record_failure("bad_params")
    assert not s.is_empty() and s.reduce()["Failed loads (bad_params)"] == 1
    old = s.clone_and_reset()
    assert s.is_empty() and old.to_dict()["load_failures"] == {"bad_params": 1}


def fresh_types(registry):
    def bound(cls):
        class Bound(cls):
            def __init__(self, *a, **kw):
                kw.setdefault("registry", registry)
                super().__init__(*a, **kw)
        return Bound
    return {prom.Gauge: bound(prom.Gauge), prom.Counter: bound(prom.Counter), prom.Histogram: bound(prom.Histogram)}


def value(registry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})


def test_prom_metrics_are_registered_and_observed_in_a_fresh_registry():
    registry = prom.CollectorRegistry()
    pm = P2pKvConnector.build_prom_metrics(NS(kv_transfer_config=None), fresh_types(registry),
                                           ["model_name", "engine"], {0: ["m", "0"]})
    s = stats({"loaded_bytes": 4096, "loaded_blocks": 4, "loaded_requests": 2, "sent_bytes": 1024,
               "sent_blocks": 1, "failed_blocks": 3, "load_retries": 1},
              {"unreachable": 1}, {"confirmed": 2, "expired": 1}, held=5, loads=[0.004, 0.2], holds=[1.5])
    pm.observe(s.to_dict(), 0)
    pm.observe(stats({"loaded_bytes": 4096}, held=2).to_dict(), 0)
    assert value(registry, "vllm:p2pkv_transfer_bytes_total", direction="loaded") == 8192
    assert value(registry, "vllm:p2pkv_transfer_bytes_total", direction="sent") == 1024
    assert value(registry, "vllm:p2pkv_transfer_blocks_total", direction="loaded") == 4
    assert value(registry, "vllm:p2pkv_loads_total") == 2
    assert value(registry, "vllm:p2pkv_failed_blocks_total") == 3
    assert value(registry, "vllm:p2pkv_load_failures_total", reason="unreachable") == 1
    assert value(registry, "vllm:p2pkv_holds_ended_total", outcome="expired") == 1
    assert value(registry, "vllm:p2pkv_holds") == 2
    assert value(registry, "vllm:p2pkv_load_seconds_count") == 2
    assert value(registry, "vllm:p2pkv_load_seconds_bucket", le="0.005") == 1
    assert value(registry, "vllm:p2pkv_hold_seconds_sum") == pytest.approx(1.5)
    assert value(registry, "vllm:p2pkv_load_retries_total") == 1
    text = prom.generate_latest(registry).decode()
    assert "# TYPE vllm:p2pkv_load_seconds histogram" in text and "# HELP vllm:p2pkv_holds " in text


def vllm_cpu_caches(num_blocks: int, fill: float):
    """Two layers of vLLM's CPU layout [blocks, heads, block_size, 2*head]."""
    import torch
    return {f"layer.{i}": torch.full((num_blocks, 2, 32, 16), fill + i, dtype=torch.float32) for i in range(2)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_worker_stats_count_a_real_load_on_both_sides(mode):
    """P and D worker halves over the loopback transport: D's stats show the bytes and blocks
    loaded and the load's latency, P's the blocks sent, the hold and its end."""
    p = P2pKvWorker(Settings(backend="loopback", mode=mode), 32, 8)
    d = P2pKvWorker(Settings(backend="loopback", mode=mode), 32, 8)
    pk, dk = vllm_cpu_caches(8, 1.0), vllm_cpu_caches(8, 0.0)
    try:
        p.register_kv_caches(pk)
        d.register_kv_caches(dk)
        assert p.take_stats().to_dict()["held"]  # start-up: this worker holds nothing
        assert p.take_stats() is None
        d.drive(P2pKvMetadata(loads=[LoadSpec("d-1", "k-1", (p.conn.address,), (5, 6),
                                               (1, 2) if mode == "pull" else None)]))
        p.drive(P2pKvMetadata(saves=[SaveSpec("p-1", "k-1", (1, 2))]))
        mid = p.take_stats()  # the hold (unless a push already ended it)
        end = time.monotonic() + 20
        sent, got = set(), set()
        while not ("p-1" in sent and "d-1" in got):
            assert time.monotonic() < end, "load did not finish"
            got |= d.transfer_results().finished_recving
            sent |= p.transfer_results().finished_sending
            time.sleep(0.002)
        assert not d.take_invalid_blocks()
        for name in dk:
            assert (dk[name][5:7] == pk[name][1:3]).all()
        ds, ps = d.take_stats().to_dict(), mid.aggregate(p.take_stats()).to_dict()
        nbytes = 2 * 2 * (2 * 32 * 16 * 4)
        assert ds["counts"]["loaded_blocks"] == 2 and ds["counts"]["loaded_requests"] == 1
        assert ds["counts"]["loaded_bytes"] == nbytes and len(ds["load_seconds"]) == 1
        assert ps["counts"]["sent_blocks"] == 2 and ps["counts"]["sent_bytes"] == nbytes
        assert ps["holds_ended"] == {"confirmed": 1} and len(ps["hold_seconds"]) == 1
        assert list(ps["held"].values()) == [0] and ps["counts"]["saved_requests"] == 1
    finally:
        p.shutdown()
        d.shutdown()
