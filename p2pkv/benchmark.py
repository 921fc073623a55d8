"""`p2pkv bench`: a P rank and a D rank build the same paged KV cache, D reads
random non-contiguous P blocks into other random D blocks, every byte is
verified, and each row stands next to a same-run baseline of the raw link.

Without torchrun the command starts P here and D as a child process; under
torchrun rank 0 is P and rank 1 is D and they meet through torchrun's store.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.layout import PRESETS, KVCacheSpec, dtype_from_name, make_kv_caches, plan_segments
from p2pkv.transport import available_transports, get_transport, transport_factory
from p2pkv.transport.base import Transport

__all__ = ["add_arguments", "main", "format_table"]

log = logging.getLogger("p2pkv.bench")
RESULT_TAG = "P2PKV_RESULT "
P_SEED, D_SEED = 1234, 98765


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


MAX_TIMEOUT = 1e6


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
    p.add_argument("--backend", default="tcp", help="transport(s), comma separated: tcp, nccl, ucx, cuda_ipc")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both KV caches live")
    p.add_argument("--layers", type=_at_least(1), default=32, help="KV layers (one tensor each, except cross_layer)")
    p.add_argument("--block-size", type=_at_least(1), default=16, help="tokens per KV block")
    p.add_argument("--kv-heads", type=_at_least(1), default=8, help="KV heads per layer")
    p.add_argument("--head-size", type=_at_least(1), default=128, help="elements per head")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or fp8 (e4m3)")
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
    p.add_argument("--role", choices=["p", "d"], help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------- cache

def _num_blocks(args: argparse.Namespace) -> tuple[int, int]:
    per_req = max(-(-t // args.block_size) for t in args.tokens)
    return per_req, per_req * args.requests + max(8, per_req * args.requests // 8)


def _cache_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """Bytes of one rank's KV cache and of its largest tensor (D's verification holds two more of those)."""
    _, nb = _num_blocks(args)
    block, heads, head = args.block_size, args.kv_heads, args.head_size
    per_block = block * head if args.layout == "mla" else 2 * block * heads * head
    per_layer = nb * per_block * dtype_from_name(args.dtype).itemsize
    total = per_layer * args.layers
    return total, total if args.layout == "cross_layer" else per_layer


FILL_CHUNK = 4 << 20


def _fill(region: torch.Tensor, seed: int) -> None:
    """Deterministic random bytes, made 4 MiB at a time so that filling (and re-making
    the expected bytes when verifying) never holds a second copy of a region."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, region.numel(), FILL_CHUNK):
        part = region[start:start + FILL_CHUNK]
        part.copy_(torch.randint(0, 256, (part.numel(),), dtype=torch.uint8, generator=g).to(region.device))


def _build(args: argparse.Namespace, device: str, seed: int) -> tuple[list[torch.Tensor], KVCacheSpec]:
    _, nb = _num_blocks(args)
    tensors, spec = make_kv_caches(args.layout, num_layers=args.layers, num_blocks=nb, block_size=args.block_size,
                                   num_kv_heads=args.kv_heads, head_size=args.head_size, dtype=args.dtype, device=device)
    for i, t in enumerate(tensors):
        _fill(t.view(torch.uint8).view(-1), seed + i)
    return tensors, spec


def _block_dim(layout: str) -> int:
    return 1 if layout == "vllm" else 0


def _verify(args: argparse.Namespace, tensors: list[torch.Tensor], last_src: dict[int, int]) -> bool:
    """D's cache equals P's on every written block (last writer wins) and its own initial bytes elsewhere,
    checked with plain tensor indexing, independent of the segment planner."""
    bdim = _block_dim(args.layout)
    order = sorted(last_src)
    dst = torch.tensor(order, dtype=torch.long, device=tensors[0].device)
    src = torch.tensor([last_src[d] for d in order], dtype=torch.long, device=tensors[0].device)
    ok = True
    for i, t in enumerate(tensors):
        got = t.view(torch.uint8)
        expect, p_bytes = torch.empty_like(got), torch.empty_like(got)
        _fill(expect.view(-1), D_SEED + args.seed + i)
        _fill(p_bytes.view(-1), P_SEED + args.seed + i)
        expect.index_copy_(bdim, dst, p_bytes.index_select(bdim, src))
        ok = ok and torch.equal(expect, got)
        del expect, p_bytes
    return bool(ok)


# --------------------------------------------------------------------------------------------- roles

_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool, int), "str": (str,),
                                       "bytes": (str,), "None": (type(None),), "dict": (dict,), "list": (list,)}


def _constructor_params(backend: str) -> dict[str, inspect.Parameter] | None:
    """The keyword options a backend's constructor chain takes (raises for an unknown backend); None when
    the chain ends open (**kw), so any key may be valid."""
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


def _options(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """--timeout and the --option pairs for `backend`, each value read as JSON unless the backend wants text;
    a key the backend does not take, or a value of another kind, is refused before any cache is built."""
    params = _constructor_params(backend)
    out: dict[str, Any] = {"timeout": args.timeout}
    for kv in args.option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--option {kv!r} is not KEY=VALUE")
        try:
            value = json.loads(v)
        except ValueError:
            value = v
        if params is not None:
            if k not in params:
                raise ValueError(f"--option {k}: backend {backend!r} takes no such option; "
                                 f"it takes {', '.join(sorted(params))}")
            names, kinds = _kinds(params[k].annotation)
            if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
                if str not in kinds:
                    raise ValueError(f"--option {k}={v!r}: backend {backend!r} expects {' or '.join(names)}")
                value = v
        out[k] = value
    return out


def _check_output(flag: str, path: str | None) -> None:
    """Refuse a --json or --plot path that cannot be written, before the run rather than after it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "bench.png" if flag == "--plot" else "bench.json")
        raise ValueError(f"{flag} {path!r} is a folder; give a file path such as {example!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: folder {folder!r} does not exist; create it first")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if flag == "--plot" and ext:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext not in kinds:
            raise ValueError(f"--plot {path!r}: matplotlib cannot write .{ext}; use one of {', '.join(sorted(kinds))}")


def _available_memory(device: str) -> int | None:
    """Bytes free now for the cache: host MemAvailable, or the free memory of this rank's GPU; None if unknown."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(args: argparse.Namespace, local_pair: bool) -> None:
    """Refuse a shape whose caches cannot fit, before allocating: P's and D's caches (both here without
    torchrun, on one host or GPU) plus D's two verification copies of its largest tensor."""
    cache, largest = _cache_bytes(args)
    is_d = local_pair or int(os.environ.get("RANK", "0")) == 1
    need = cache * (2 if local_pair and args.device == "cpu" else 1) + (2 * largest if is_d else 0)
    free = _available_memory(args.device)
    if free is not None and need > free:
        raise ValueError(f"this run needs {need / 2**30:.1f} GiB of {args.device} memory ({cache / 2**30:.1f} GiB "
                         f"of KV cache per rank) but {free / 2**30:.1f} GiB is available; "
                         "lower --tokens, --requests or --layers")


def _device(args: argparse.Namespace) -> str:
    if args.device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device here")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local % torch.cuda.device_count()}"


def _rss_mib() -> float:
    """Resident memory now (the interpreter and libraries, before the cache exists)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_d(args: argparse.Namespace, backend: str, p_address: str) -> list[dict[str, Any]]:
    """D's side: read random P blocks into random D blocks, time it, verify, return result rows."""
    device = _device(args)
    rss_base = _rss_mib()
    tensors, spec = _build(args, device, D_SEED + args.seed)
    tr: Transport = get_transport(backend, **_options(args, backend))
    rows = []
    try:
        tr.register(tensors, spec)
        peer = tr.connect(p_address)
        rng = np.random.default_rng(args.seed)
        per_req, nb = _num_blocks(args)
        last_src: dict[int, int] = {}
        peak, baseline_ran = 0.0, False  # D's peak RSS over the transfers before any baseline buffer exists
        t_start = time.perf_counter()
        for tokens in args.tokens:
            nblk = -(-tokens // args.block_size)
            lat: list[float] = []
            base: list[float] = []
            nbytes = 0
            total = args.warmup + args.iters
            for it in range(total):
                dst_perm = rng.permutation(nb)
                for r in range(args.requests):
                    src = rng.choice(nb, nblk, replace=False)
                    dst = dst_perm[r * nblk:(r + 1) * nblk]
                    segs = plan_segments(peer.spec, spec, src, dst)
                    nbytes = segs.nbytes
                    measured = it >= args.warmup
                    # The baseline runs interleaved with the requests, so both see the same machine load, and
                    # every other time first, so neither always runs right after the planning (caches cold).
                    base_first = measured and len(lat) % 2 == 1
                    if base_first:
                        base.append(tr.baseline(peer, nbytes, 1))
                    t0 = time.perf_counter()
                    tr.read(peer, segs, request_id=f"bench-{tokens}-{it}-{r}").wait(args.timeout)
                    dt = time.perf_counter() - t0
                    if not baseline_ran:
                        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    if measured:
                        baseline_ran = True
                        if not base_first:
                            base.append(tr.baseline(peer, nbytes, 1))
                        lat.append(dt)
                    last_src.update(zip(dst.tolist(), src.tolist()))
                if time.perf_counter() - t_start > 2 or it == total - 1:
                    _progress(f"[p2pkv bench] {backend} {tokens} tokens: iteration {it + 1}/{total}, "
                              f"last request {nbytes / max(lat[-1] if lat else 1, 1e-9) / 1e9:.2f} GB/s")
                    t_start = time.perf_counter()
            gbps = nbytes / statistics.median(lat) / 1e9
            bgbps = nbytes / statistics.median(base) / 1e9
            rows.append({"backend": backend, "device": args.device, "layout": args.layout, "dtype": args.dtype,
                         "tokens": tokens, "requests": args.requests, "bytes": nbytes, "segments": len(segs),
                         "gbps": round(gbps, 4), "baseline_gbps": round(bgbps, 4), "ratio": round(gbps / bgbps, 4),
                         "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
                         "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 4), "verified": False})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ok = _verify(args, tensors, last_src)
        cache_mib = sum(r.nbytes for r in spec.regions) / 2**20
        for row in rows:
            row.update(verified=ok, cache_mib=round(cache_mib, 1), d_rss_base_mib=round(rss_base, 1),
                       d_peak_rss_mib=round(peak, 1))
        tr.send_notif(peer, {"bench": "done"})
    finally:
        tr.close()
    return rows


def run_p(args: argparse.Namespace, backend: str, publish: Callable[[str], None],
          collect: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """P's side: register the random cache, serve D until it reports, return D's rows."""
    device = _device(args)
    tr: Transport = get_transport(backend, **_options(args, backend))
    try:
        tensors, spec = _build(args, device, P_SEED + args.seed)
        tr.register(tensors, spec)
        publish(tr.address)
        return collect()
    finally:
        tr.close()


def _child_argv(args: argparse.Namespace, backend: str, address: str) -> list[str]:
    argv = [sys.executable, "-m", "p2pkv", "bench", "--role", "d", "--connect", address, "--backend", backend,
            "--device", args.device, "--layers", str(args.layers), "--block-size", str(args.block_size),
            "--kv-heads", str(args.kv_heads), "--head-size", str(args.head_size), "--dtype", args.dtype,
            "--layout", args.layout, "--requests", str(args.requests), "--iters", str(args.iters),
            "--warmup", str(args.warmup), "--timeout", str(args.timeout), "--seed", str(args.seed),
            "--tokens", *map(str, args.tokens)]
    for o in args.option:
        argv += ["--option", o]
    return argv


def _local_pair(args: argparse.Namespace, backend: str) -> list[dict[str, Any]]:
    child: list[subprocess.Popen] = []

    # NCCL refuses two ranks on one GPU: D takes the second device, as rank 1 of torchrun would
    env = {**os.environ, "LOCAL_RANK": "1"} if backend == "nccl" and args.device == "cuda" else None

    def publish(address: str) -> None:
        child.append(subprocess.Popen(_child_argv(args, backend, address), stdout=subprocess.PIPE, text=True, env=env))

    def collect() -> list[dict[str, Any]]:
        out, _ = child[0].communicate()
        if child[0].returncode != 0:
            raise SystemExit(f"the D process failed (exit {child[0].returncode}); see its messages above")
        for line in out.splitlines():
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
        raise SystemExit("the D process ended without results")
    try:
        return run_p(args, backend, publish, collect)
    finally:
        for c in child:
            if c.poll() is None:
                c.kill()
                c.wait()


def _torchrun_pair(args: argparse.Namespace, backend: str) -> list[dict[str, Any]] | None:
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    key = f"p2pkv/bench/{backend}"
    if rank == 0:
        def collect() -> list[dict[str, Any]]:
            store.wait([key + "/result"], __import__("datetime").timedelta(seconds=args.timeout * 20))
            return json.loads(store.get(key + "/result").decode())
        return run_p(args, backend, lambda a: store.set(key + "/addr", a), collect)
    if rank == 1:
        store.wait([key + "/addr"])
        rows = run_d(args, backend, store.get(key + "/addr").decode())
        store.set(key + "/result", json.dumps(rows))
    return None


# --------------------------------------------------------------------------------------------- output

COLUMNS = [("backend", "backend", "{}"), ("device", "dev", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"),
           ("tokens", "tokens", "{}"), ("segments", "segs", "{}"), ("bytes", "MiB/req", None), ("gbps", "GB/s", "{:.2f}"),
           ("baseline_gbps", "base GB/s", "{:.2f}"), ("ratio", "ratio", "{:.3f}"), ("p50_ms", "p50 ms", "{:.3f}"),
           ("p99_ms", "p99 ms", "{:.3f}"), ("verified", "verified", "{}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [c[1] for c in COLUMNS]
    body = [[f"{r['bytes'] / 2**20:.1f}" if key == "bytes" else fmt.format(r.get(key, "")) for key, _, fmt in COLUMNS]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'p2pkv[plot]'", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in rows}):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in rs], [r["gbps"] for r in rs], "o-", label=f"p2pkv {backend}")
        ax.plot([r["tokens"] for r in rs], [r["baseline_gbps"] for r in rs], "x--", label=f"raw baseline {backend}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per request")
    ax.set_ylabel("GB/s (payload)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    dtype_from_name(args.dtype)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends:
        raise ValueError(f"--backend names no transport; choose from {', '.join(available_transports())}")
    for backend in backends:
        _options(args, backend)
    if args.role == "d":
        rows = run_d(args, backends[0], args.connect)
        print(RESULT_TAG + json.dumps(rows), flush=True)
        return 0
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if int(os.environ.get("RANK", "0")) == 0:
        _check_output("--json", args.json)
        _check_output("--plot", args.plot)
    _check_memory(args, local_pair=not under_torchrun)
    if "nccl" in backends and args.device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() < 2:
        raise SystemExit("--backend nccl --device cuda needs two GPUs, one per rank (NCCL refuses two ranks on one "
                         "GPU); this machine has one. Use --device cpu (gloo), or --backend cuda_ipc for two "
                         "processes on one GPU.")
    rows: list[dict[str, Any]] = []
    for backend in backends:
        got = _torchrun_pair(args, backend) if under_torchrun else _local_pair(args, backend)
        if got is None:
            return 0
        rows += got
    print(format_table(rows))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("role", "connect")}
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2)
    if args.plot:
        _plot(rows, args.plot)
    return 0 if all(r["verified"] for r in rows) else 1
