"""`TransferParams`: the one shape of a request's `kv_transfer_params`, shared by the vLLM
adapter (which reads and writes them) and the router (which builds P's and D's).

It follows vLLM's NixlConnector convention, so vLLM's own toy proxy works unchanged:
P's request carries `{"do_remote_decode": true}`; P's output carries the params D's
request must carry, passed on as they are. Keys this shape does not know (e.g. those
vLLM or the toy proxy add) are ignored on reading and never needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TransferParams", "MODES"]

MODES = ("pull", "push")


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class TransferParams:
    """One request's KV transfer instructions.

    P's request: `do_remote_decode` (and, push, the router's `transfer_id`). D's request:
    `do_remote_prefill`, `transfer_mode`, P's p2pkv `remote_address`; pull adds the
    request id and block ids P holds and how many tokens they cover; push adds the
    `transfer_id` P knows the request by and, optionally, the router's `router_callback`.
    A tensor-parallel P (pull) adds `remote_addresses`, one per P rank in rank order, and
    `remote_tp_size`; `remote_address` is then rank 0's.
    """

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    transfer_mode: str = "pull"
    remote_address: str | None = None
    remote_request_id: str | None = None
    remote_block_ids: tuple[int, ...] | None = None
    remote_num_tokens: int | None = None
    transfer_id: str | None = None
    router_callback: str | None = None
    remote_addresses: tuple[str, ...] | None = None
    remote_tp_size: int | None = None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def for_prefill(cls, transfer_id: str | None = None) -> "TransferParams":
        """What a router sends P: prefill, then hold (pull) or push to D (`transfer_id`)."""
        return cls(do_remote_decode=True, transfer_id=transfer_id)

    @classmethod
    def pull_from(cls, address: str | tuple[str, ...], request_id: str, block_ids: list[int],
                  num_tokens: int) -> "TransferParams":
        """What P's output carries in pull mode: where D reads which blocks (`address`: P's, or
        its TP ranks' in rank order)."""
        group = None if isinstance(address, str) or len(address) == 1 else tuple(address)
        return cls(do_remote_prefill=True, transfer_mode="pull",
                   remote_address=address if isinstance(address, str) else address[0],
                   remote_request_id=request_id, remote_block_ids=tuple(block_ids), remote_num_tokens=num_tokens,
                   remote_addresses=group, remote_tp_size=None if group is None else len(group))

    @classmethod
    def push_to(cls, p_address: str, transfer_id: str, router_callback: str | None = None) -> "TransferParams":
        """What a router sends D in push mode: P's p2pkv address, the transfer id, the callback."""
        return cls(do_remote_prefill=True, transfer_mode="push", remote_address=p_address,
                   transfer_id=transfer_id, router_callback=router_callback)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "TransferParams":
        """Read a request's params as given (not validated: see `problem`); unknown keys are ignored."""
        raw = raw or {}
        ids = raw.get("remote_block_ids")
        addrs = raw.get("remote_addresses")
        return cls(remote_addresses=tuple(addrs) if isinstance(addrs, list) else addrs,
                   remote_tp_size=raw.get("remote_tp_size"),
                   do_remote_decode=bool(raw.get("do_remote_decode")),
                   do_remote_prefill=bool(raw.get("do_remote_prefill")),
                   transfer_mode=raw.get("transfer_mode") or "pull",
                   remote_address=raw.get("remote_address"), remote_request_id=raw.get("remote_request_id"),
                   remote_block_ids=tuple(ids) if isinstance(ids, list) else ids,
                   remote_num_tokens=raw.get("remote_num_tokens"), transfer_id=raw.get("transfer_id"),
                   router_callback=raw.get("router_callback"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict vLLM carries: only the keys that say something (None and False dropped,
        except the two flags once set, which the NixlConnector convention always sends)."""
        out: dict[str, Any] = {}
        if self.do_remote_prefill:
            out.update(do_remote_prefill=True, do_remote_decode=False, transfer_mode=self.transfer_mode)
        elif self.do_remote_decode:
            out["do_remote_decode"] = True
        for k in ("remote_address", "remote_request_id", "remote_num_tokens", "transfer_id", "router_callback",
                  "remote_tp_size"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        for k in ("remote_block_ids", "remote_addresses"):
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v)
        return out

    # ---------------------------------------------------------------- reading D's side
    @property
    def key(self) -> str | None:
        """The id P knows the request by: its request id (pull) or the transfer id (push)."""
        return self.remote_request_id if self.transfer_mode == "pull" else self.transfer_id

    @property
    def peers(self) -> tuple[str, ...]:
        """P's ranks' addresses in rank order (one for a P without tensor parallelism)."""
        if self.remote_addresses is not None:
            return self.remote_addresses
        return (self.remote_address,) if self.remote_address is not None else ()

    def problem(self) -> str | None:
        """What is wrong with a consumer's params, or None. They come with the request, so a
        malformed set must cost a local prefill, never the engine."""
        if self.transfer_mode not in MODES:
            return f"transfer_mode {self.transfer_mode!r} is neither 'pull' nor 'push'"
        if not isinstance(self.remote_address, str) or ":" not in self.remote_address:
            return f"remote_address {self.remote_address!r} is not a 'host:port' string"
        if self.transfer_mode == "push":
            if not isinstance(self.transfer_id, str) or not self.transfer_id:
                return f"transfer_id {self.transfer_id!r} is not a non-empty string"
            if self.router_callback is not None and not isinstance(self.router_callback, str):
                return f"router_callback {self.router_callback!r} is not a URL string"
            return None
        if not isinstance(self.remote_request_id, str) or not self.remote_request_id:
            return f"remote_request_id {self.remote_request_id!r} is not a non-empty string"
        ids = self.remote_block_ids
        if not isinstance(ids, tuple) or not ids or not all(_is_uint(b) for b in ids):
            return "remote_block_ids is not a non-empty list of non-negative integers"
        if self.remote_num_tokens is not None and not _is_uint(self.remote_num_tokens):
            return f"remote_num_tokens {self.remote_num_tokens!r} is not a non-negative integer"
        group = self.remote_addresses
        if group is None:
            return None if self.remote_tp_size in (None, 1) else "remote_tp_size without remote_addresses"
        if not isinstance(group, tuple) or not group or not all(isinstance(a, str) and ":" in a for a in group):
            return "remote_addresses is not a non-empty list of 'host:port' strings"
        if self.remote_tp_size != len(group):
            return f"remote_tp_size {self.remote_tp_size!r} differs from the {len(group)} remote_addresses"
        if group[0] != self.remote_address:
            return "remote_address is not the first of remote_addresses (P's rank 0)"
        return None
