"""p2pkv's figures in vLLM's own metrics. `P2pKvStats` is the connector's KVConnectorStats:
each worker fills one per step from the connector's counters (`ConnectorStats`) and its
own timings, vLLM sums the workers', logs a summary per interval and hands the data to
`P2pKvPromMetrics`, which keeps the Prometheus series that vLLM's /metrics serves."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics, KVConnectorStats,
                                                                  PromMetric, PromMetricT)

from p2pkv.connector import ConnectorStats

__all__ = ["P2pKvStats", "P2pKvPromMetrics", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_SUMMED = ("counts", "load_failures", "holds_ended")
_LISTED = ("load_seconds", "hold_seconds")


def _sum_into(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


@dataclass
class P2pKvStats(KVConnectorStats):
    """What moved since the last report, as plain (msgpack-able) data.

    `counts`, `load_failures` (by cause) and `holds_ended` (by outcome) are summed when
    aggregated; `load_seconds` and `hold_seconds` (one entry per load or hold) are
    concatenated; `held` maps a worker to the holds it keeps now, the latest value per
    worker winning, so summing it gives the instance's holds however often it is merged."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        for k in _SUMMED + ("held",):
            self.data.setdefault(k, {})
        for k in _LISTED:
            self.data.setdefault(k, [])

    def reset(self) -> None:
        self.data = {**{k: {} for k in _SUMMED}, **{k: [] for k in _LISTED}, "held": {}}

    # ---------------------------------------------------------------- filled by the adapter
    def add(self, delta: ConnectorStats, worker: str | None = None) -> None:
        """Add a change of the connector's counters (`ConnectorStats.since`); with `worker`,
        also record that worker's holds now."""
        _sum_into(self.data["counts"], delta.counts)
        _sum_into(self.data["load_failures"], delta.load_failures)
        _sum_into(self.data["holds_ended"], delta.holds_ended)
        if worker is not None:
            self.data["held"][worker] = delta.held

    def record_failure(self, cause: str) -> None:
        """A load that never started (e.g. its transfer params were refused)."""
        _sum_into(self.data["load_failures"], {cause: 1})

    def observe_load(self, seconds: float) -> None:
        self.data["load_seconds"].append(float(seconds))

    def observe_hold(self, seconds: float) -> None:
        self.data["hold_seconds"].append(float(seconds))

    def clone_and_reset(self) -> "P2pKvStats":
        old = copy.copy(self)
        self.reset()
        return old

    # ---------------------------------------------------------------- KVConnectorStats
    def is_empty(self) -> bool:
        return not any(self.data[k] for k in _SUMMED + _LISTED + ("held",))

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other.is_empty():
            return self
        for k in _SUMMED:
            _sum_into(self.data[k], other.data.get(k, {}))
        for k in _LISTED:
            self.data[k].extend(other.data.get(k, []))
        self.data["held"].update(other.data.get("held", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        """One line's worth for vLLM's periodic log."""
        c, loads = self.data["counts"], np.asarray(self.data["load_seconds"], dtype=np.float64)
        out: dict[str, int | float] = {
            "Loads": c.get("loaded_requests", 0),
            "Loaded blocks": c.get("loaded_blocks", 0),
            "Loaded MB": round(c.get("loaded_bytes", 0) / 2**20, 3),
            "Sent blocks": c.get("sent_blocks", 0),
            "Sent MB": round(c.get("sent_bytes", 0) / 2**20, 3),
            "Avg load ms": round(float(loads.mean()) * 1e3, 3) if len(loads) else 0,
            "P90 load ms": round(float(np.percentile(loads, 90)) * 1e3, 3) if len(loads) else 0,
            "Failed loads": sum(self.data["load_failures"].values()),
            "Failed blocks": c.get("failed_blocks", 0),
            "Holds kept": sum(self.data["held"].values()),
            "Holds expired": self.data["holds_ended"].get("expired", 0),
        }
        out.update({f"Failed loads ({cause})": n for cause, n in sorted(self.data["load_failures"].items())})
        return out


class P2pKvPromMetrics(KVConnectorPromMetrics):
    """The series on vLLM's /metrics, each with vLLM's engine labels (plus the one named):

    vllm:p2pkv_transfer_bytes_total / _blocks_total {direction=loaded|sent}, vllm:p2pkv_loads_total,
    vllm:p2pkv_load_failures_total {reason}, vllm:p2pkv_failed_blocks_total,
    vllm:p2pkv_load_seconds (histogram: from the step that posts a load to the step that reports it),
    vllm:p2pkv_holds (gauge: holds kept now), vllm:p2pkv_holds_ended_total {outcome=confirmed|expired|
    aborted|error}, vllm:p2pkv_hold_seconds (histogram), vllm:p2pkv_load_retries_total,
    vllm:p2pkv_checksum_mismatches_total."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter, gauge, hist = self._counter_cls, self._gauge_cls, self._histogram_cls
        names = list(labelnames)
        self.bytes = counter(name="vllm:p2pkv_transfer_bytes", labelnames=names + ["direction"],
                             documentation="KV cache bytes p2pkv moved: loaded into this instance (D) or sent "
                                           "from it (P: written in push mode, read by D in pull mode).")
        self.blocks = counter(name="vllm:p2pkv_transfer_blocks", labelnames=names + ["direction"],
                              documentation="KV cache blocks p2pkv moved, as vllm:p2pkv_transfer_bytes.")
        self.loads = counter(name="vllm:p2pkv_loads", labelnames=names,
                             documentation="Requests whose KV cache p2pkv loaded completely (D).")
        self.failures = counter(name="vllm:p2pkv_load_failures", labelnames=names + ["reason"],
                                documentation="Loads that failed, by reason; their blocks are recomputed (D).")
        self.failed_blocks = counter(name="vllm:p2pkv_failed_blocks", labelnames=names,
                                     documentation="Blocks of failed loads, recomputed by vLLM (D).")
        self.load_seconds = hist(name="vllm:p2pkv_load_seconds", labelnames=names, buckets=list(LATENCY_BUCKETS),
                                 documentation="Load latency: from the step that posts a load to the step that "
                                               "reports it ended (D).")
        self.holds = gauge(name="vllm:p2pkv_holds", labelnames=names, multiprocess_mode="mostrecent",
                           documentation="Requests whose blocks this instance holds for a decode instance (P).")
        self.holds_ended = counter(name="vllm:p2pkv_holds_ended", labelnames=names + ["outcome"],
                                   documentation="Holds ended, by outcome: confirmed by D, expired (hold_timeout), "
                                                 "aborted, error (P).")
        self.hold_seconds = hist(name="vllm:p2pkv_hold_seconds", labelnames=names, buckets=list(LATENCY_BUCKETS),
                                 documentation="How long P held a request's blocks, from the hold to its end (P).")
        self.retries = counter(name="vllm:p2pkv_load_retries", labelnames=names,
                               documentation="Loads read again over a fresh connection after the first found it "
                                             "closed (D).")
        self.mismatches = counter(name="vllm:p2pkv_checksum_mismatches", labelnames=names,
                                  documentation="Blocks whose checksum differed (with checksum on).")

    def _labels(self, metric: Any, engine_idx: int, *extra: str) -> Any:
        return metric.labels(*self.per_engine_labelvalues[engine_idx], *extra)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = P2pKvStats(data=dict(transfer_stats_data)).data
        c = d["counts"]
        for direction in ("loaded", "sent"):
            if c.get(f"{direction}_bytes"):
                self._labels(self.bytes, engine_idx, direction).inc(c[f"{direction}_bytes"])
            if c.get(f"{direction}_blocks"):
                self._labels(self.blocks, engine_idx, direction).inc(c[f"{direction}_blocks"])
        for metric, key in ((self.loads, "loaded_requests"), (self.failed_blocks, "failed_blocks"),
                            (self.retries, "load_retries"), (self.mismatches, "checksum_mismatches")):
            if c.get(key):
                self._labels(metric, engine_idx).inc(c[key])
        for reason, n in d["load_failures"].items():
            self._labels(self.failures, engine_idx, reason).inc(n)
        for outcome, n in d["holds_ended"].items():
            self._labels(self.holds_ended, engine_idx, outcome).inc(n)
        for s in d["load_seconds"]:
            self._labels(self.load_seconds, engine_idx).observe(s)
        for s in d["hold_seconds"]:
            self._labels(self.hold_seconds, engine_idx).observe(s)
        if d["held"]:
            self._labels(self.holds, engine_idx).set(sum(d["held"].values()))
