"""`p2pkv bench`'s flags, and every check of them that can fail before a cache is built: numbers in range,
a backend that exists and has a raw baseline to compare with, its --option keys and kinds, output paths."""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from typing import Any, Callable

import torch

from p2pkv.bench.errors import BenchError
from p2pkv.layout import PRESETS
from p2pkv.transport import Transport, available_transports, transport_factory

__all__ = ["add_arguments", "backends_of", "backend_options", "check_output", "check_device", "DTYPES",
           "MAX_TIMEOUT"]

DTYPES = ("bf16", "fp16", "fp32", "fp8")
MAX_TIMEOUT = 1e6


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, refused with the bound in the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds in (0, MAX_TIMEOUT] (sockets refuse larger ones)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags on `p`; their names and the --json fields are a contract that scripts rely on."""
    p.add_argument("--backend", default="tcp", help="transport(s), comma separated: tcp, nccl, ucx, cuda_ipc")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both KV caches live")
    p.add_argument("--layers", type=_at_least(1), default=32, help="KV layers (one tensor each, except cross_layer)")
    p.add_argument("--block-size", type=_at_least(1), default=16, help="tokens per KV block")
    p.add_argument("--kv-heads", type=_at_least(1), default=8, help="KV heads per layer")
    p.add_argument("--head-size", type=_at_least(1), default=128, help="elements per head")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="element type (fp8 is e4m3)")
    p.add_argument("--layout", default="vllm", choices=list(PRESETS), help="KV tensor layout preset")
    p.add_argument("--tokens", type=_at_least(1), nargs="+", default=[2048],
                   help="tokens per request (several values: one row each)")
    p.add_argument("--requests", type=_at_least(1), default=4, help="requests per iteration, each its own random blocks")
    p.add_argument("--iters", type=_at_least(1), default=5, help="measured iterations")
    p.add_argument("--warmup", type=_at_least(0), default=1, help="iterations run first and not measured")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here (by P / rank 0)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against tokens per request (needs matplotlib)")
    p.add_argument("--timeout", type=_seconds, default=120.0, help="seconds before a stalled transfer is an error")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random caches and block choices")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option passed to get_transport (repeatable), e.g. pack_threshold=65536")
    p.add_argument("--busy", action="store_true",
                   help="also measure the same reads with P's engine busy (a pure-Python thread in its process, "
                        "against the same spin in another process) and with D's thread as an engine loop "
                        "(1 ms of Python between done() polls), each against the idle run")
    p.add_argument("--connector", action="store_true",
                   help="measure the connector's pull loads against bare reads of the same blocks, loads spread "
                        "over --producers processes, --concurrency at a time (see also --freeze-one)")
    p.add_argument("--producers", type=_at_least(1), default=4, help="--connector: producer processes")
    p.add_argument("--concurrency", type=_at_least(1), nargs="+", default=[1, 64],
                   help="--connector: loads in flight at once (several values: one row each)")
    p.add_argument("--freeze-one", action="store_true",
                   help="--connector: also run each row with one producer frozen (SIGSTOP)")
    p.add_argument("--load-timeout", type=_seconds, default=10.0, help="--connector: the consumer's load timeout")
    p.add_argument("--role", choices=["p", "d"], help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)


def _benchable() -> list[str]:
    """Registered backends a bench can compare with a raw link (every one but the in-process loopback)."""
    return [b for b in available_transports() if b != "loopback"]


def backends_of(args: argparse.Namespace) -> list[str]:
    """The --backend names, each known and with a raw baseline of its link, else a BenchError naming the choices."""
    names = [b.strip() for b in args.backend.split(",") if b.strip()]
    choices = ", ".join(_benchable())
    if not names:
        raise BenchError(f"--backend names no transport; choose from {choices}")
    for name in names:
        if name not in available_transports():
            raise BenchError(f"--backend {name}: no such transport; choose from {choices}")
        factory = transport_factory(name)
        if getattr(factory, "baseline", None) is Transport.baseline:
            raise BenchError(f"--backend {name}: it has no raw link to measure a baseline against "
                             f"(loopback is an in-process test double); choose from {choices}")
    return names


_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool, int), "str": (str,),
                                       "bytes": (str,), "None": (type(None),), "dict": (dict,), "list": (list,)}


def _constructor_params(backend: str) -> dict[str, inspect.Parameter] | None:
    """The keyword options a backend's constructor chain takes; None when the chain ends open (**kw), so any
    key may be valid."""
    params: dict[str, inspect.Parameter] = {}
    for cls in getattr(transport_factory(backend), "__mro__", ()):
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        sig = inspect.signature(init)
        params.update({n: p for n, p in sig.parameters.items() if n != "self" and n not in params
                       and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)})
        if all(p.kind is not p.VAR_KEYWORD for p in sig.parameters.values()):
            return params
    return None


def _kinds(annotation: Any) -> tuple[list[str], tuple[type, ...]]:
    """The names and Python types an annotation allows; no types when it names something else."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "?")
    names = [a.strip().split("[")[0] for a in text.split("|")]
    return names, tuple(k for n in names for k in _KINDS[n]) if all(n in _KINDS for n in names) else ()


def backend_options(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """--timeout and the --option pairs for `backend`, each value read as JSON unless the backend wants text;
    a key the backend does not take, or a value of another kind, is refused before any cache is built."""
    params = _constructor_params(backend)
    out: dict[str, Any] = {"timeout": args.timeout}
    for kv in args.option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise BenchError(f"--option {kv!r} is not KEY=VALUE")
        try:
            value = json.loads(v)
        except ValueError:
            value = v
        if params is not None:
            if k not in params:
                raise BenchError(f"--option {k}: backend {backend!r} takes no such option; "
                                 f"it takes {', '.join(sorted(params))}")
            names, kinds = _kinds(params[k].annotation)
            if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
                if str not in kinds:
                    raise BenchError(f"--option {k}={v!r}: backend {backend!r} expects {' or '.join(names)}")
                value = v
        out[k] = value
    return out


def check_output(flag: str, path: str | None) -> None:
    """Refuse a --json or --plot path that cannot be written, before the run rather than after it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "bench.png" if flag == "--plot" else "bench.json")
        raise BenchError(f"{flag} {path!r} is a folder; give a file path such as {example!r}")
    if not os.path.isdir(folder):
        raise BenchError(f"{flag} {path!r}: folder {folder!r} does not exist; create it first")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if flag == "--plot" and ext:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext not in kinds:
            raise BenchError(f"--plot {path!r}: matplotlib cannot write .{ext}; use one of {', '.join(sorted(kinds))}")


def check_device(args: argparse.Namespace, backends: list[str]) -> None:
    """Refuse --device cuda where torch sees no GPU, and NCCL on CUDA with fewer than two GPUs."""
    if args.device != "cuda":
        return
    if not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device here; use --device cpu")
    if "nccl" in backends and torch.cuda.device_count() < 2:
        raise BenchError("--backend nccl --device cuda needs two GPUs, one per rank (NCCL refuses two ranks on one "
                         "GPU); this machine has one. Use --device cpu (gloo), or --backend cuda_ipc for two "
                         "processes on one GPU.")
