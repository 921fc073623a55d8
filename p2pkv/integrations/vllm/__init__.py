"""vLLM v1 adapter: `P2pKvConnector` moves a prompt's KV blocks from a prefill instance (P)
to a decode instance (D) with `p2pkv.connector`.

Load it with `kv_connector="P2pKvConnector"`, `kv_connector_module_path=
"p2pkv.integrations.vllm"`, settings in `kv_connector_extra_config` (`Settings`).
Requests carry `TransferParams` as vLLM's NixlConnector does. Modules: connector (the
facade vLLM loads), scheduler (what moves), worker (the transport and its per-step
polling), specs (what the scheduler hands the worker), settings, metrics (KVConnectorStats
and Prometheus series), notify (push mode's callback to the router).
"""
from p2pkv.integrations.params import TransferParams
from p2pkv.integrations.vllm.connector import P2pKvConnector
from p2pkv.integrations.vllm.metrics import P2pKvPromMetrics, P2pKvStats
from p2pkv.integrations.vllm.settings import Settings
from p2pkv.integrations.vllm.specs import DiscardSpec, LoadSpec, P2pKvMetadata, SaveSpec

__all__ = ["P2pKvConnector", "Settings", "TransferParams", "P2pKvMetadata", "LoadSpec", "SaveSpec", "DiscardSpec",
           "P2pKvStats", "P2pKvPromMetrics"]
