"""Engine-neutral KV connector: a producer (P) saves a request's blocks, a consumer
(D) loads them into its own blocks, in pull ("P then D": D reads) or push ("D then
P": D tells P its blocks, P writes) mode, layer by layer, over any transport.

Work happens in the engine's own calls: `save`, `load` and `get_finished` (every
step) post transfers, poll them, read peers' messages and expire what ran out of
time; no connector thread completes a request. Per-peer dials are polled there too
(links.py; native for tcp and cuda_ipc, a short-lived thread per dial elsewhere), and
control sends that may block go out from a sender thread per peer, so a frozen peer
delays nobody else.

Modules: core (the facade), producer (holds), consumer (loads), messages (one
class per control message), links (per-peer dial and send), layers (tensor ↔
layer map, per-layer segments and checksums), records (plain state records).

P never holds blocks forever: a hold ends when D confirms, or after `hold_timeout`.
A failed load names exactly the local blocks that did not arrive, so the engine
can recompute them. A pull load is reported loaded only after P confirms it still
held the request when D read it.
"""
from p2pkv.connector.core import MODES, KVConnector
from p2pkv.connector.records import FAILURE_CAUSES, ConnectorStats, Finished, LoadFailure

__all__ = ["KVConnector", "Finished", "LoadFailure", "MODES", "ConnectorStats", "FAILURE_CAUSES"]
