"""Transport registry: `get_transport(name, **options)` finds a backend by its short
name; third parties add theirs under the entry point group `p2pkv.transports`."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from p2pkv.transport.base import (Connecting, Notif, Peer, PeerClosedError, RequestGone, RequestNotHeldYet,
                                  TransferError, TransferHandle, TransferTimeout, Transport)

__all__ = ["get_transport", "transport_factory", "register_transport", "available_transports", "Transport",
           "TransferHandle", "Peer", "Notif", "TransferError", "PeerClosedError", "TransferTimeout", "RequestGone",
           "RequestNotHeldYet", "Connecting", "BackendUnavailable"]

_BUILTIN: dict[str, str] = {
    "loopback": "p2pkv.transport.loopback:LoopbackTransport",
    "tcp": "p2pkv.transport.tcp:TcpTransport",
    "nccl": "p2pkv.transport.nccl:NcclTransport",
    "ucx": "p2pkv.transport.ucx:UcxTransport",
    "cuda_ipc": "p2pkv.transport.cuda_ipc:CudaIpcTransport",
}
_EXTRA: dict[str, Callable[..., Transport]] = {}


class BackendUnavailable(ImportError):
    """A known backend cannot be used here (a missing package); the message says how to install it."""


def register_transport(name: str, factory: Callable[..., Transport]) -> None:
    """Add a backend at run time (the entry point group does this for installed packages)."""
    _EXTRA[name] = factory


def _entry_points() -> dict[str, Any]:
    try:
        return {ep.name: ep for ep in entry_points(group="p2pkv.transports")}
    except Exception:  # noqa: BLE001 - a broken third-party package must not break p2pkv
        return {}


def available_transports() -> list[str]:
    return sorted(set(_BUILTIN) | set(_EXTRA) | set(_entry_points()))


def _load(name: str) -> Callable[..., Transport]:
    if name in _EXTRA:
        return _EXTRA[name]
    if name in _BUILTIN:
        module, _, attr = _BUILTIN[name].partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("p2pkv."):
                raise BackendUnavailable(f"backend {name!r} is not part of this p2pkv build") from None
            raise
        return getattr(mod, attr)
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    raise ValueError(f"unknown transport {name!r}; available: {available_transports()}")


def transport_factory(name: str, /) -> Callable[..., Transport]:
    """The class (or factory) behind a backend name, not yet called: lets a caller check options first."""
    return _load(name)


def get_transport(name: str, /, **options: Any) -> Transport:
    """Create a transport by name: 'tcp', 'nccl', 'ucx', 'cuda_ipc', 'loopback' or a registered third party."""
    return _load(name)(**options)
