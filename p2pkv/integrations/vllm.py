"""vLLM v1 adapter: `P2pKvConnector`, a KVConnectorBase_V1 that moves a prompt's KV
blocks from a prefill instance (P) to a decode instance (D) with `p2pkv.connector`.

Load it with `kv_connector="P2pKvConnector"`, `kv_connector_module_path=
"p2pkv.integrations.vllm"`, settings in `kv_connector_extra_config` (see
`Settings`). Requests follow vLLM's NixlConnector convention: P's request carries
`kv_transfer_params={"do_remote_decode": true}` and P's output carries the params
D's request must carry. The scheduler half decides what moves; the worker half
(one per engine worker process) owns the transport, and vLLM's own per-step calls
(`start_load_kv`, `wait_for_save`, `get_finished`) post and poll its transfers.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorHandshakeMetadata,
                                                              KVConnectorMetadata, KVConnectorRole,
                                                              KVConnectorTransferResults, SupportsHMA)

from p2pkv.connector import KVConnector
from p2pkv.layout import KVCacheSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["P2pKvConnector", "Settings", "P2pKvMetadata"]

log = logging.getLogger("p2pkv.vllm")


@dataclass(frozen=True)
class Settings:
    """Every key `kv_connector_extra_config` understands (unknown keys are refused).

    backend: transport name ('tcp', 'ucx', 'nccl', 'cuda_ipc', ...). mode: 'pull'
    (D reads P's held blocks) or 'push' (D sends P its block ids, P writes). listen:
    where this instance's worker listens ('host:port'; port 0 picks one). advertise:
    the address peers should dial, when it differs from `listen` (e.g. listen on
    0.0.0.0). auth_token: shared secret for the handshake's HMAC (else the env var
    P2PKV_AUTH_TOKEN). hold_timeout: seconds P keeps a finished request's blocks
    waiting for D. load_timeout: seconds D waits for a load before recomputing.
    checksum: verify a CRC32 per block and layer. metrics_path: a JSON file the
    worker rewrites with its counters. push_layers: in push mode, P writes each
    layer to D as soon as the prefill's last step has computed it, overlapping the
    transfer with the next layers. transport_options: extra keywords for the
    transport.
    """

    backend: str = "tcp"
    mode: str = "pull"
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    auth_token: str | None = None
    hold_timeout: float = 120.0
    load_timeout: float = 30.0
    checksum: bool = False
    metrics_path: str | None = None
    push_layers: bool = True
    transport_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "Settings":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"P2pKvConnector: unknown kv_connector_extra_config keys {unknown}; "
                             f"known keys are {sorted(known)}")
        s = cls(**extra)
        if s.mode not in ("pull", "push"):
            raise ValueError(f"P2pKvConnector: mode must be 'pull' or 'push', got {s.mode!r}")
        return s


@dataclass
class P2pKvMetadata(KVConnectorMetadata):
    """Scheduler → worker, once per step: plain lists of plain dicts.

    saves: {req, key, blocks} (P: hold / push these blocks). layer_saves: the same,
    for prefills that complete in this step (P, push: send each layer once computed).
    drops: keys P no longer holds for (aborted). loads: {req, key, peer, blocks,
    remote_blocks, offset} (D: fill these). discards: {peer, key} (D: tell P it can
    drop a request D will not load)."""

    saves: list[dict[str, Any]] = field(default_factory=list)
    layer_saves: list[dict[str, Any]] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    loads: list[dict[str, Any]] = field(default_factory=list)
    discards: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class P2pKvHandshake(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up: where the worker's transport listens."""

    address: str


class _NeedNotifier:
    """Push mode, D's scheduler: tells the router whether a transfer needs P, by a
    small JSON POST to the request's `router_callback` URL. Posts go from one daemon
    thread with a short timeout, so vLLM's scheduler never waits on the router; a
    router that cannot be reached only costs it its wait (it then sends to P)."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout
        self._q: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._warned = False

    def post(self, url: Any, transfer_id: str, need: bool, tokens: int) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="p2pkv-router-callback", daemon=True)
            self._thread.start()
        self._q.put((url, {"transfer_id": transfer_id, "need_prefill": need, "tokens": tokens}))

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            url, body = item
            req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read()
            except (OSError, ValueError) as e:
                if not self._warned:
                    log.warning("could not tell the router at %s whether transfer %s needs P (%s); it will "
                                "send the request to P after its own wait", url, body["transfer_id"], e)
                    self._warned = True

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _params_problem(params: dict[str, Any]) -> str | None:
    """What is wrong with a consumer's kv_transfer_params, or None. They come with the
    request, so a malformed set must cost a local prefill, never the engine."""
    mode = params.get("transfer_mode", "pull")
    if mode not in ("pull", "push"):
        return f"transfer_mode {mode!r} is neither 'pull' nor 'push'"
    if not isinstance(params.get("remote_address"), str) or ":" not in params["remote_address"]:
        return f"remote_address {params.get('remote_address')!r} is not a 'host:port' string"
    if mode == "push":
        if not isinstance(params.get("transfer_id"), str) or not params["transfer_id"]:
            return f"transfer_id {params.get('transfer_id')!r} is not a non-empty string"
        if params.get("router_callback") is not None and not isinstance(params["router_callback"], str):
            return f"router_callback {params['router_callback']!r} is not a URL string"
        return None
    if not isinstance(params.get("remote_request_id"), str) or not params["remote_request_id"]:
        return f"remote_request_id {params.get('remote_request_id')!r} is not a non-empty string"
    ids = params.get("remote_block_ids")
    if not isinstance(ids, list) or not ids or not all(_is_uint(b) for b in ids):
        return "remote_block_ids is not a non-empty list of non-negative integers"
    if params.get("remote_num_tokens") is not None and not _is_uint(params["remote_num_tokens"]):
        return f"remote_num_tokens {params['remote_num_tokens']!r} is not a non-negative integer"
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_dim(t: torch.Tensor, num_blocks: int) -> int | None:
    """The dim of a vLLM KV tensor that indexes blocks: of the dims of size
    `num_blocks`, the one with the largest stride (blocks are outermost within a
    layer in every vLLM layout; a head or token dim of the same size is inside)."""
    cands = [d for d in range(t.dim()) if t.shape[d] == num_blocks]
    return max(cands, key=lambda d: t.stride(d)) if cands else None


class P2pKvConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM v1 KV connector over p2pkv; roles kv_producer, kv_consumer and kv_both."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        self.settings = Settings.from_extra(cfg.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.is_producer, self.is_consumer = cfg.is_kv_producer, cfg.is_kv_consumer
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise NotImplementedError("P2pKvConnector moves one worker's KV cache per instance; tensor/pipeline "
                                      f"parallel sizes {par.tensor_parallel_size}/{par.pipeline_parallel_size} "
                                      "are not supported yet (run P and D with TP=1, PP=1)")
        groups = len(kv_cache_config.kv_cache_groups)
        if groups > 1:
            raise ValueError(f"P2pKvConnector supports models with one KV cache group; this one has {groups} "
                             "(sliding-window or hybrid layers); run with --disable-hybrid-kv-cache-manager "
                             "or use a full-attention model")
        # scheduler half
        self._address: str | None = self.settings.advertise
        self._pending = P2pKvMetadata()
        self._held: dict[str, str] = {}
        self._p_push: dict[str, Any] = {}
        self._layered: dict[str, str] = {}
        self._notifier = _NeedNotifier()
        # worker half
        self.conn: KVConnector | None = None
        self._key_to_req: dict[str, str] = {}
        self._invalid: set[int] = set()
        self._metrics_written: dict[str, int] = {}
        self._layer_index: dict[str, int] = {}
        self._dropped: set[str] = set()

    # ================================================================ scheduler side
    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if self._address is None:
            for m in metadata.values():
                if isinstance(m, P2pKvHandshake):
                    self._address = m.address
                    break

    def _my_address(self) -> str:
        if self._address is None:
            host, _, port = self.settings.listen.rpartition(":")
            if port in ("", "0") or host in ("0.0.0.0", "::", "[::]"):
                raise RuntimeError("P2pKvConnector: the worker did not report its address; set 'advertise' "
                                   "(or a fixed 'listen' host:port) in kv_connector_extra_config")
            self._address = self.settings.listen
        return self._address

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or not self.is_consumer:
            return 0, False
        problem = _params_problem(params)
        if problem is not None:
            log.warning("request %s: kv_transfer_params ignored, the prompt is computed here: %s",
                        request.request_id, problem)
            params["do_remote_prefill"] = False
            return 0, False
        n = request.num_prompt_tokens
        if params.get("transfer_mode", "pull") == "pull":
            n = min(n, params.get("remote_num_tokens") or n)
        elif n - num_computed_tokens <= self.block_size:
            # D's own prefix cache holds every full block of the prompt it can hold (a
            # prefix cache never holds the last token): P is not needed for the rest.
            return 0, False
        count = n - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if (params and params.get("do_remote_decode") and self.is_producer and self.settings.mode == "push"
                and self.settings.push_layers and params.get("transfer_id")
                and request.request_id not in self._layered):
            self._p_push[request.request_id] = request
        if not params or not params.get("do_remote_prefill") or not self.is_consumer:
            return
        params["do_remote_prefill"] = False
        mode = params.get("transfer_mode", "pull")
        peer = params.get("remote_address")
        key = params.get("remote_request_id") if mode == "pull" else params.get("transfer_id")
        if not peer or not key:
            log.warning("request %s: kv_transfer_params lack remote_address/request id: %s", request.request_id, params)
            return
        if mode == "push":
            self._notifier.post(params.get("router_callback"), key, num_external_tokens > 0, num_external_tokens)
        if num_external_tokens <= 0:
            self._pending.discards.append({"peer": peer, "key": key})
            return
        group = blocks.blocks[0]
        local_done = sum(1 for b in group if b.block_hash is not None and not b.is_null)
        local = [b.block_id for b in group if b.block_hash is None and not b.is_null]
        load = {"req": request.request_id, "key": key, "peer": peer, "offset": local_done}
        if mode == "pull":
            remote = list(params["remote_block_ids"])[local_done:local_done + len(local)]
            load.update(blocks=local[:len(remote)], remote_blocks=remote)
        else:
            load.update(blocks=local[:_cdiv(num_external_tokens + local_done * self.block_size, self.block_size)
                                     - local_done], remote_blocks=None)
        self._pending.loads.append(load)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta, self._pending = self._pending, P2pKvMetadata()
        if self._p_push and self._kv_cache_manager is not None:
            for req_id, n in (scheduler_output.num_scheduled_tokens or {}).items():
                req = self._p_push.get(req_id)
                if req is None or req.num_computed_tokens + n < req.num_prompt_tokens:
                    continue
                del self._p_push[req_id]
                key = str(req.kv_transfer_params["transfer_id"])
                blocks = list(self._kv_cache_manager.get_block_ids(req_id)[0])[:_cdiv(req.num_prompt_tokens,
                                                                                        self.block_size)]
                self._layered[req_id] = key
                meta.layer_saves.append({"req": req_id, "key": key, "blocks": blocks})
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill") and self.is_consumer:
            # D aborted before allocation: let P drop what it holds for us.
            params["do_remote_prefill"] = False
            mode = params.get("transfer_mode", "pull")
            key = params.get("remote_request_id") if mode == "pull" else params.get("transfer_id")
            if params.get("remote_address") and key:
                self._pending.discards.append({"peer": params["remote_address"], "key": key})
            if mode == "push" and key:
                self._notifier.post(params.get("router_callback"), key, False, 0)
            return False, None
        if not params.get("do_remote_decode") or not self.is_producer:
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
            address = self._my_address()
        except RuntimeError as e:
            log.error("request %s: not holding its KV for a decode instance: %s", request.request_id, e)
            return False, None
        mode = self.settings.mode
        key = str(params.get("transfer_id") or request.request_id)
        self._held[request.request_id] = key
        self._pending.saves.append({"req": request.request_id, "key": key, "blocks": blocks})
        out = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_mode": mode,
               "remote_address": address, "remote_request_id": key, "remote_block_ids": blocks,
               "remote_num_tokens": n}
        if mode == "push":
            out["transfer_id"] = key
        return True, out

    def update_connector_output(self, connector_output: Any) -> None:
        for req_id in connector_output.finished_sending or ():
            self._held.pop(req_id, None)

    def has_pending_push_work(self) -> bool:
        return bool(self._held)

    def get_finished_count(self) -> int | None:
        return None

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        return None

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register the engine's own tensors (as they are) with the transport."""
        s = self.settings
        names = list(kv_caches)
        tensors = [kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        num_blocks = self._kv_cache_config.num_blocks
        spec = KVCacheSpec.from_tensors(tensors, num_blocks=num_blocks, block_dim=_block_dim(tensors[0], num_blocks),
                                        block_size=self.block_size, num_layers=len(tensors), layout="vllm-engine")
        opts = dict(s.transport_options)
        if s.backend != "loopback":
            opts.setdefault("listen", s.listen)
        if s.auth_token:
            opts["auth_token"] = s.auth_token
        self.conn = KVConnector(s.backend, mode=s.mode, hold_timeout=s.hold_timeout, load_timeout=s.load_timeout,
                                checksum=s.checksum, layerwise=False, **opts)
        self.conn.register_kv_caches(tensors, spec)
        log.info("P2pKvConnector worker: %d KV tensors (%d blocks, %d bytes/block) registered on %s (%s, %s mode)",
                 len(tensors), spec.num_blocks, spec.bytes_per_block, self.conn.address, s.backend, s.mode)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        if self.conn is None:
            return None
        return P2pKvHandshake(self.settings.advertise or self.conn.address)

    def _drive(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, P2pKvMetadata) or self.conn is None:
            return
        for s in meta.saves:
            self._key_to_req[s["key"]] = s["req"]
            try:
                self.conn.save(s["key"], s["blocks"])
            except ValueError as e:  # preempted after its layers went out: hold the blocks it ended in
                log.warning("request %s: %s; holding its final blocks instead", s["req"], e)
                self.conn.release(s["key"])
                self.conn.save(s["key"], s["blocks"])
        for key in meta.drops:
            self._key_to_req.pop(key, None)
            self._dropped.add(key)
            self.conn.release(key)
        for ld in meta.loads:
            self.conn.load(ld["req"], ld["blocks"], peer=ld["peer"], remote_request_id=ld["key"],
                           remote_block_ids=ld["remote_blocks"], remote_offset=ld["offset"])
        for d in meta.discards:
            self.conn.discard(d["peer"], d["key"])
        meta.saves, meta.loads, meta.discards, meta.drops = [], [], [], []

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._drive()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous (the request waits between steps), so nothing to wait for here."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Push mode: hand each layer of prefills completing in this step to the connector
        as soon as it is computed, so it travels while the next layers compute."""
        meta = self._connector_metadata
        if not isinstance(meta, P2pKvMetadata) or not meta.layer_saves or self.conn is None:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        ready = None
        if kv_layer.is_cuda:
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
        for s in meta.layer_saves:
            self._key_to_req[s["key"]] = s["req"]
            self.conn.save(s["key"], s["blocks"], layer=layer, ready=ready, final=False)

    def wait_for_save(self) -> None:
        self._drive()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        out = KVConnectorTransferResults()
        if self.conn is None:
            return out
        f = self.conn.get_finished()  # also what moves this worker's transfers along, once per step
        for key in f.saved:
            if key in self._dropped:  # vLLM freed those blocks itself when the request was aborted
                self._dropped.discard(key)
                continue
            out.finished_sending.add(self._key_to_req.pop(key, key))
        out.finished_recving |= f.loaded
        for req, failure in f.failed.items():
            self._invalid.update(failure.blocks)
        self.conn.metrics["reported_finished_sending"] += len(out.finished_sending)
        self.conn.metrics["reported_finished_recving"] += len(out.finished_recving)
        self._write_metrics()
        return out

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def _write_metrics(self) -> None:
        path = self.settings.metrics_path
        if not path or self.conn is None:
            return
        snap = dict(self.conn.metrics)
        snap["held_requests"] = len(self.conn.holding())
        if snap == self._metrics_written:
            return
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".")
        with os.fdopen(fd, "w") as fh:
            json.dump(snap, fh)
        os.replace(tmp, path)
        self._metrics_written = snap

    def shutdown(self) -> None:
        self._notifier.close()
        if self.conn is not None:
            self._write_metrics()
            self.conn.close()
            self.conn = None
