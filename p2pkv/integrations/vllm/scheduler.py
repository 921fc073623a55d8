"""The scheduler half of P2pKvConnector: it reads each request's `TransferParams`, decides
which blocks move, and hands the worker half typed specs once per step. It never touches
a transport; vLLM calls it from the scheduler process."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from p2pkv.integrations.params import TransferParams
from p2pkv.integrations.vllm.metrics import P2pKvStats
from p2pkv.integrations.vllm.notify import NeedNotifier
from p2pkv.integrations.vllm.settings import Settings
from p2pkv.integrations.vllm.specs import DiscardSpec, LoadSpec, P2pKvHandshake, P2pKvMetadata, SaveSpec

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["P2pKvScheduler"]

log = logging.getLogger("p2pkv.vllm")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class P2pKvScheduler:
    """What moves: P holds (or pushes) a finished prefill's blocks; D loads the blocks its
    prefix cache lacks, or tells P it needs none."""

    def __init__(self, settings: Settings, block_size: int, is_producer: bool, is_consumer: bool, tp_size: int = 1):
        self.settings, self.block_size, self.tp_size = settings, block_size, tp_size
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.kv_cache_manager: "KVCacheManager | None" = None
        self._addresses: tuple[str, ...] | None = (settings.advertise,) if settings.advertise and tp_size == 1 else None
        self._pending = P2pKvMetadata()
        self._held: dict[str, str] = {}
        self._p_push: dict[str, "Request"] = {}
        self._layered: dict[str, str] = {}
        self._notifier = NeedNotifier()
        self._stats = P2pKvStats()

    # ---------------------------------------------------------------- start-up
    def set_handshake(self, metadata: dict[int, Any]) -> None:
        """Learn every worker's transport address, by TP rank, unless `advertise` named the one."""
        if self._addresses is not None:
            return
        got = {rank: m.address for rank, m in metadata.items() if isinstance(m, P2pKvHandshake)}
        if sorted(got) == list(range(self.tp_size)):
            self._addresses = tuple(got[r] for r in range(self.tp_size))
        else:
            log.error("P2pKvConnector: expected the addresses of TP ranks 0..%d, got ranks %s",
                      self.tp_size - 1, sorted(got))

    def _my_addresses(self) -> tuple[str, ...]:
        if self._addresses is None:
            host, _, port = self.settings.listen.rpartition(":")
            if self.tp_size > 1 or port in ("", "0") or host in ("0.0.0.0", "::", "[::]"):
                raise RuntimeError("P2pKvConnector: the workers did not report their addresses; set 'advertise' "
                                   "(or a fixed 'listen' host:port) in kv_connector_extra_config")
            self._addresses = (self.settings.listen,)
        return self._addresses

    # ---------------------------------------------------------------- D: what to load
    def _consumer_params(self, request: "Request") -> TransferParams | None:
        """The request's params if D is to load it, else None."""
        raw = request.kv_transfer_params
        if not raw or not raw.get("do_remote_prefill") or not self.is_consumer:
            return None
        return TransferParams.from_dict(raw)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = self._consumer_params(request)
        if params is None:
            return 0, False
        problem = params.problem()
        if problem is not None:
            log.warning("request %s: kv_transfer_params ignored, the prompt is computed here: %s",
                        request.request_id, problem)
            request.kv_transfer_params["do_remote_prefill"] = False
            self._stats.record_failure("bad_params")
            return 0, False
        n = request.num_prompt_tokens
        if params.transfer_mode == "pull":
            n = min(n, params.remote_num_tokens or n)
        elif n - num_computed_tokens <= self.block_size:
            # D's own prefix cache holds every full block of the prompt it can hold (a
            # prefix cache never holds the last token): P is not needed for the rest.
            return 0, False
        count = n - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        raw = request.kv_transfer_params
        if (raw and raw.get("do_remote_decode") and self.is_producer and self.settings.mode == "push"
                and self.settings.push_layers and raw.get("transfer_id")
                and request.request_id not in self._layered):
            self._p_push[request.request_id] = request
        params = self._consumer_params(request)
        if params is None:
            return
        raw["do_remote_prefill"] = False
        peers, key = params.peers, params.key
        if not peers or not key:
            log.warning("request %s: kv_transfer_params lack remote_address/request id: %s", request.request_id, raw)
            return
        if params.transfer_mode == "push":
            self._notifier.post(params.router_callback, key, num_external_tokens > 0, num_external_tokens)
        if num_external_tokens <= 0:
            self._pending.discards.append(DiscardSpec(peers, key))
            return
        group = blocks.blocks[0]
        local_done = sum(1 for b in group if b.block_hash is not None and not b.is_null)
        local = [b.block_id for b in group if b.block_hash is None and not b.is_null]
        if params.transfer_mode == "pull":
            assert params.remote_block_ids is not None
            remote = params.remote_block_ids[local_done:local_done + len(local)]
            load = LoadSpec(request.request_id, key, peers, tuple(local[:len(remote)]), tuple(remote), local_done)
        else:
            n = _cdiv(num_external_tokens + local_done * self.block_size, self.block_size) - local_done
            load = LoadSpec(request.request_id, key, peers, tuple(local[:n]), None, local_done)
        self._pending.loads.append(load)

    # ---------------------------------------------------------------- P: what to hold or push
    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> P2pKvMetadata:
        meta, self._pending = self._pending, P2pKvMetadata()
        if self._p_push and self.kv_cache_manager is not None:
            for req_id, n in (scheduler_output.num_scheduled_tokens or {}).items():
                req = self._p_push.get(req_id)
                if req is None or req.num_computed_tokens + n < req.num_prompt_tokens:
                    continue
                del self._p_push[req_id]
                key = str(req.kv_transfer_params["transfer_id"])
                ids = self.kv_cache_manager.get_block_ids(req_id)[0]
                blocks = tuple(ids)[:_cdiv(req.num_prompt_tokens, self.block_size)]
                self._layered[req_id] = key
                meta.layer_saves.append(SaveSpec(req_id, key, blocks))
        return meta

    def request_finished(self, request: "Request",
                         block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """P: hold a finished prefill's blocks and name them for D. D: a request aborted
        before allocation lets P drop what it holds for it."""
        from vllm.v1.request import RequestStatus
        raw = request.kv_transfer_params
        if not raw:
            return False, None
        params = self._consumer_params(request)
        if params is not None:
            raw["do_remote_prefill"] = False
            if params.peers and params.key:
                self._pending.discards.append(DiscardSpec(params.peers, params.key))
            if params.transfer_mode == "push" and params.key:
                self._notifier.post(params.router_callback, params.key, False, 0)
            return False, None
        asked = TransferParams.from_dict(raw)
        if not asked.do_remote_decode or not self.is_producer:
            return False, None
        self._p_push.pop(request.request_id, None)
        layered = self._layered.pop(request.request_id, None)
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            if layered is not None:
                self._pending.drops.append(layered)
            return False, None
        n = request.num_computed_tokens
        blocks = list(block_ids[0])[:_cdiv(n, self.block_size)]
        if not blocks:
            return False, None
        try:
            addresses = self._my_addresses()
        except RuntimeError as e:
            log.error("request %s: not holding its KV for a decode instance: %s", request.request_id, e)
            return False, None
        key = str(asked.transfer_id or request.request_id)
        self._held[request.request_id] = key
        self._pending.saves.append(SaveSpec(request.request_id, key, tuple(blocks)))
        out = TransferParams.pull_from(addresses, key, blocks, n)
        if self.settings.mode == "push":
            out = replace(out, transfer_mode="push", transfer_id=key)
        return True, out.to_dict()

    def update_connector_output(self, connector_output: Any) -> None:
        for req_id in connector_output.finished_sending or ():
            self._held.pop(req_id, None)

    def has_pending_push_work(self) -> bool:
        return bool(self._held)

    def take_stats(self) -> P2pKvStats | None:
        """What the scheduler counted since vLLM last asked (transfer params it refused)."""
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, P2pKvStats()
        return out

    def shutdown(self) -> None:
        self._notifier.close()
