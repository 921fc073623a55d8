"""`Settings`: every key `kv_connector_extra_config` understands, checked once at start-up."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from p2pkv.integrations.params import MODES

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """Every key `kv_connector_extra_config` understands (unknown keys are refused).

    backend: transport name ('tcp', 'ucx', 'nccl', 'cuda_ipc', ...). mode: 'pull'
    (D reads P's held blocks) or 'push' (D sends P its block ids, P writes). listen:
    where this instance's worker listens ('host:port'; port 0 picks one; with tensor
    parallelism rank r listens on port + r). advertise: the address peers should dial,
    when it differs from `listen` (e.g. listen on 0.0.0.0; rank r: port + r, or its own
    port when the port given is 0). auth_token: shared secret for the handshake's HMAC (else the env var
    P2PKV_AUTH_TOKEN). hold_timeout: seconds P keeps a finished request's blocks
    waiting for D. load_timeout: seconds D waits for a load before recomputing.
    checksum: verify a CRC32 per block and layer. metrics_path: a JSON file the
    worker rewrites with its cumulative counters (the same figures also go to
    vLLM's stats and /metrics); with tensor parallelism each rank r writes its own,
    `x.tpR.json` for `x.json`. push_layers: in push mode, P writes each layer to D
    as soon as the prefill's last step has computed it, overlapping the transfer
    with the next layers. transport_options: extra keywords for the transport.
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
        if s.mode not in MODES:
            raise ValueError(f"P2pKvConnector: mode must be 'pull' or 'push', got {s.mode!r}")
        return s
