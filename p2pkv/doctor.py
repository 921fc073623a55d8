"""`p2pkv doctor`: what this machine offers p2pkv — versions, devices, and for each
backend whether it can be used here and, if not, what to install."""
from __future__ import annotations

import importlib
import json
import os
import platform
import socket
import sys
from typing import Any, Callable

import torch

__all__ = ["report", "main"]


def _try(fn: Callable[[], Any]) -> tuple[bool, str]:
    try:
        out = fn()
        return True, "" if out is None else str(out)
    except Exception as e:  # noqa: BLE001 - the doctor reports, it never fails
        return False, f"{type(e).__name__}: {e}"


def _backend_checks() -> dict[str, tuple[bool, str]]:
    import torch.distributed as dist

    def ucx() -> str:
        mod = importlib.import_module("p2pkv.transport.ucx")
        describe = getattr(mod, "describe", None)
        return json.dumps(describe()) if describe else "ucxx importable"

    def cuda_ipc() -> str:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible")
        mod = importlib.import_module("p2pkv.kernels")
        state = getattr(mod, "status", lambda: "kernels module present")()
        return f"{torch.cuda.device_count()} device(s); {state}"

    def nccl() -> str:
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        parts = [f"gloo {'yes' if dist.is_gloo_available() else 'no'}",
                 f"NCCL {'yes' if dist.is_nccl_available() and torch.cuda.is_available() else 'no (CPU tensors use gloo)'}"]
        return ", ".join(parts)

    return {"tcp": (True, "always available (CUDA tensors are staged through pinned host memory)"),
            "nccl": _try(nccl), "ucx": _try(ucx), "cuda_ipc": _try(cuda_ipc)}


def _huge_pages() -> str | None:
    """The kernel's transparent huge page mode (the bracketed word), or None off Linux: tcp and nccl
    ask for 2 MiB pages under registered CPU memory, which `never` refuses."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else text.strip()


def report() -> dict[str, Any]:
    from p2pkv import __version__
    from p2pkv.transport import available_transports
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "p2pkv": __version__, "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "torch": torch.__version__, "cuda_available": cuda, "cuda_devices": devices,
        "cuda_runtime": torch.version.cuda, "registered_transports": available_transports(),
        "backends": {k: {"ok": ok, "detail": d} for k, (ok, d) in _backend_checks().items()},
        "auth_token_configured": bool(os.environ.get("P2PKV_AUTH_TOKEN")),
        "transparent_huge_pages": _huge_pages(),
        "vllm": _try(lambda: importlib.import_module("vllm").__version__)[1] if importlib.util.find_spec("vllm") else None,
    }


def main(as_json: bool = False) -> int:
    r = report()
    if as_json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"p2pkv {r['p2pkv']}  python {r['python']}  torch {r['torch']}  ({r['platform']})")
    print(f"CUDA: {'yes, ' + ', '.join(r['cuda_devices']) if r['cuda_available'] else 'no device'}")
    print(f"vLLM: {r['vllm'] or 'not installed'}")
    print(f"auth token (P2PKV_AUTH_TOKEN): {'set' if r['auth_token_configured'] else 'not set'}")
    thp = r["transparent_huge_pages"]
    if thp is not None:
        note = ("registered CPU memory stays on 4 KiB pages; scattered small blocks cost more"
                if thp == "never" else "registered CPU memory is put on 2 MiB pages")
        print(f"transparent huge pages: {thp} ({note})")
    print("backends:")
    for name, b in r["backends"].items():
        print(f"  {name:9s} {'ok ' if b['ok'] else 'no '} {b['detail']}")
    extra = sorted(set(r["registered_transports"]) - set(r["backends"]) - {"loopback"})
    if extra:
        print(f"  third-party transports: {', '.join(extra)}")
    return 0
