"""What the ucx backend uses on this machine: its data paths (`put`, `staged`) and how 'auto'
picks one for a memory kind, the UCX features its context asks for, and `describe()`
for `p2pkv doctor`."""
from __future__ import annotations

from typing import Any

import torch

from p2pkv.transport.ucx.ucp import context_config, load

__all__ = ["PATHS", "FEATURES", "resolve_path", "describe"]

PATHS = ("auto", "put", "staged")
FEATURES = ("TAG", "RMA", "WAKEUP")  # of the UCX context


def _kernels_ready() -> bool:
    try:
        from p2pkv import kernels
        return kernels.load() is not None
    except Exception:  # noqa: BLE001 - no extension means the per-segment put path
        return False


def resolve_path(path: str, device: torch.device) -> str:
    """'auto' is `staged` for CUDA memory when p2pkv's gather/scatter kernels are built, else `put`."""
    if path not in PATHS:
        raise ValueError(f"ucx path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    return "staged" if device.type == "cuda" and _kernels_ready() else "put"


def describe() -> dict[str, Any]:
    """What the ucx backend uses on this machine (for `p2pkv doctor`): versions, the data path per memory kind,
    the progress mode, and the UCX transports a context here can use."""
    api, _ = load()
    import ucxx
    ctx = api.UCXContext(context_config(), feature_flags=tuple(getattr(api.Feature, f) for f in FEATURES))
    tls = sorted({line.rsplit(" ", 1)[-1].split("/")[0] for line in ctx.info.splitlines() if "resource" in line})
    return {
        "ucxx": ucxx.__version__, "ucx": ".".join(map(str, api.get_ucx_version())),
        "transports": tls, "cuda_support": bool(ctx.cuda_support),
        "data_path": "one-sided, posted by the caller's thread: read = one GET per segment, write = one PUT per "
                     "segment; then a flush, and a write's notify tag message only after the flush completed",
        "host_memory": "path 'put': one zero-copy cma GET/PUT per segment (process_vm_readv/writev, done inside "
                       "the posting call); UCX_CMA_MEMORY_INVALIDATE=y keeps cma with peer-failure handling on",
        "cuda_memory": "cuda_ipc get_zcopy/put_zcopy (UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto enables GET); path "
                       "'auto' is 'staged' (gather kernel, one put per chunk, scatter kernel, on the control "
                       "plane's threads) when p2pkv's CUDA kernels load, else 'put'",
        "progress": "ucxx's blocking progress thread (epoll), woken by ucp_worker_signal after a post UCX did not "
                    "finish inline; completion is polled (ucp_request_check_status) or waited for in "
                    "sem_timedwait without the GIL",
        "error_handling": "peer failure mode (a dead peer is an error, never an abort); handles also fail on "
                          "control-socket hang-up and at the transport timeout",
        "context_settings": context_config(),
    }
