"""`P2pKvConnector`, the KVConnectorBase_V1 that vLLM loads: a thin facade that checks the
configuration and forwards each hook to the half that vLLM calls it on, the scheduler
half (`P2pKvScheduler`) or the worker half (`P2pKvWorker`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorHandshakeMetadata,
                                                              KVConnectorMetadata, KVConnectorRole,
                                                              KVConnectorTransferResults, SupportsHMA)

from p2pkv.integrations.vllm.metrics import P2pKvPromMetrics, P2pKvStats
from p2pkv.integrations.vllm.scheduler import P2pKvScheduler
from p2pkv.integrations.vllm.settings import Settings
from p2pkv.integrations.vllm.worker import P2pKvWorker, Shard

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics, KVConnectorStats,
                                                                      PromMetric, PromMetricT)
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["P2pKvConnector"]


class P2pKvConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM v1 KV connector over p2pkv; roles kv_producer, kv_consumer and kv_both."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        self.settings = Settings.from_extra(cfg.kv_connector_extra_config)
        block_size = vllm_config.cache_config.block_size
        par = vllm_config.parallel_config
        tp = par.tensor_parallel_size
        if par.pipeline_parallel_size > 1:
            raise NotImplementedError(f"P2pKvConnector does not support pipeline parallelism (pipeline_parallel_size "
                                      f"{par.pipeline_parallel_size}); run P and D with PP=1 (tensor parallelism "
                                      "works, in pull mode)")
        if tp > 1 and self.settings.mode == "push":
            raise NotImplementedError(f"P2pKvConnector: push mode needs tensor_parallel_size 1 (this instance has "
                                      f"{tp}); use mode 'pull', which works between any TP sizes")
        groups = len(kv_cache_config.kv_cache_groups)
        if groups > 1:
            raise ValueError(f"P2pKvConnector supports models with one KV cache group; this one has {groups} "
                             "(sliding-window or hybrid layers); run with --disable-hybrid-kv-cache-manager "
                             "or use a full-attention model")
        self.scheduler: P2pKvScheduler | None = None
        self.worker: P2pKvWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = P2pKvScheduler(self.settings, block_size, cfg.is_kv_producer, cfg.is_kv_consumer, tp)
        else:
            model = vllm_config.model_config
            heads = 0 if model.use_mla else model.get_total_num_kv_heads()
            self.worker = P2pKvWorker(self.settings, block_size, kv_cache_config.num_blocks,
                                      Shard(heads, model.get_head_size(), tp))

    # ================================================================ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self.scheduler is not None
        self.scheduler.kv_cache_manager = kv_cache_manager

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        assert self.scheduler is not None
        self.scheduler.set_handshake(metadata)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.scheduler is not None
        self.scheduler.update_connector_output(connector_output)

    def has_pending_push_work(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_push_work()

    def get_finished_count(self) -> int | None:
        return None

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        """Heads outside tokens within a block (HND), so that one head's slice of a block is one span
        for a rank of another TP size (MLA has no heads: any layout)."""
        model = vllm_config.model_config
        return None if model is None or model.use_mla else "LBHNC"

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.handshake() if self.worker is not None else None

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.drive(self._connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous (the request waits between steps), so nothing to wait for here."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.save_layer(self._connector_metadata, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self.worker is not None
        self.worker.drive(self._connector_metadata)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self.worker is not None
        return self.worker.transfer_results()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.take_invalid_blocks()

    # ================================================================ both sides
    def get_kv_connector_stats(self) -> "KVConnectorStats | None":
        """What moved since vLLM last asked: the worker's transfers, or the scheduler's refusals."""
        if self.worker is not None:
            return self.worker.take_stats()
        return self.scheduler.take_stats() if self.scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> "KVConnectorStats | None":
        return P2pKvStats(data=data) if data is not None else P2pKvStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig",
                           metric_types: dict[type["PromMetric"], type["PromMetricT"]], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> "KVConnectorPromMetrics | None":
        return P2pKvPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.worker is not None:
            self.worker.shutdown()
