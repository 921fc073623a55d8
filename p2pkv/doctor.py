"""`p2pkv doctor`: what this machine offers p2pkv — versions, devices, and for each backend one line:
available and with what, or why not and what to install."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

__all__ = ["BackendCheck", "report", "main"]


@dataclass(frozen=True)
class BackendCheck:
    """One backend on this machine: usable or not, what it runs on (or why not), and the version behind it."""
    ok: bool
    detail: str
    version: str = ""


def _why(e: BaseException) -> str:
    """An exception as a reader wants it: the message, with the type only when the message alone says little."""
    text = str(e).strip()
    return text if text and not isinstance(e, (AttributeError, TypeError, KeyError)) else f"{type(e).__name__}: {e}"


def _check(fn: Callable[[], BackendCheck]) -> BackendCheck:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the doctor reports, it never fails
        return BackendCheck(False, _why(e))


def _tcp() -> BackendCheck:
    from p2pkv import __version__
    from p2pkv.transport import native
    native.require("tcp")
    return BackendCheck(True, "native data path p2pkv._native; CUDA tensors are staged through pinned host memory",
                        f"p2pkv {__version__}")


def _nccl() -> BackendCheck:
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    importlib.import_module("p2pkv._c10d")
    gloo = "gloo for CPU tensors (native data path p2pkv._c10d)" if dist.is_gloo_available() else "no gloo"
    if not torch.cuda.is_available():
        nccl = "NCCL: no CUDA device"
    elif dist.is_nccl_available():
        nccl = f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))} for CUDA tensors"
    else:
        nccl = "NCCL: not in this torch build"
    return BackendCheck(True, f"{gloo}; {nccl}", f"torch {torch.__version__}")


def _ucx() -> BackendCheck:
    mod = importlib.import_module("p2pkv.transport.ucx")
    d = mod.describe()
    if not d["cuda_support"]:
        cuda = "host memory only (this UCX has no CUDA support)"
    elif not torch.cuda.is_available():
        cuda = "host memory (no CUDA device visible)"
    else:
        cuda = "host and CUDA memory"
    return BackendCheck(True, f"{cuda}; UCX transports {', '.join(d['transports'])}",
                        f"ucxx {d['ucxx']}, UCX {d['ucx']}")


def _cuda_ipc() -> BackendCheck:
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device visible to torch {torch.__version__}")
    from p2pkv import kernels
    return BackendCheck(True, f"{torch.cuda.device_count()} device(s); {kernels.build_state()}",
                        f"CUDA runtime {torch.version.cuda}")


BACKENDS: dict[str, Callable[[], BackendCheck]] = {"tcp": _tcp, "nccl": _nccl, "ucx": _ucx, "cuda_ipc": _cuda_ipc}


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


def _vllm_version() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        return importlib.import_module("vllm").__version__
    except Exception as e:  # noqa: BLE001
        return f"installed, but it does not import ({_why(e)})"


def report() -> dict[str, Any]:
    """Everything `p2pkv doctor` knows, as JSON-ready values."""
    from p2pkv import __version__
    from p2pkv.transport import available_transports
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "p2pkv": __version__, "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "torch": torch.__version__, "cuda_available": cuda, "cuda_devices": devices,
        "cuda_runtime": torch.version.cuda, "registered_transports": available_transports(),
        "backends": {name: asdict(_check(fn)) for name, fn in BACKENDS.items()},
        "auth_token_configured": bool(os.environ.get("P2PKV_AUTH_TOKEN")),
        "transparent_huge_pages": _huge_pages(),
        "vllm": _vllm_version(),
    }


def main(as_json: bool = False) -> int:
    """Print the report as text (one line per backend) or as JSON."""
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
        version = f" [{b['version']}]" if b["version"] else ""
        print(f"  {name:9s} {'yes' if b['ok'] else 'no '}  {b['detail']}{version}")
    extra = sorted(set(r["registered_transports"]) - set(r["backends"]) - {"loopback"})
    if extra:
        print(f"  third-party transports: {', '.join(extra)}")
    return 0
