"""GPU check and benchmark of the ucx backend on one device (for the lent GPU machine).

Two processes on cuda:0 (P serves, this process is D) move random block sets over
UCX for every layout and both directions, byte-exact (D's other blocks untouched),
then D times reads of the default shape at several tokens per request next to a
same-run device-to-device copy of the same bytes and one contiguous ucxx send.
P runs with UCX_PROTO_INFO=y: the protocol table UCX chose for the puts is printed
and saved. Results go to OUTDIR/ucx_gpu.json.

    python bench/gpu_ucx.py OUTDIR [--tokens 64 512 2048 4096 32768] [--iters 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pkv.layout import PRESETS, make_kv_caches, plan_segments  # noqa: E402
from p2pkv.transport import get_transport  # noqa: E402

BLOCK_DIM = {"vllm": 1}
DEV = os.environ.get("GPU_UCX_DEVICE", "cuda:0")  # "cpu" runs the same script on host memory (a dry run)
SMALL = dict(num_layers=3, num_blocks=64, block_size=16, num_kv_heads=4, head_size=64)
DTYPES = ["bf16"] + (["fp8"] if hasattr(torch, "float8_e4m3fn") else [])


def sync() -> None:
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def perf_shape(max_tokens: int) -> dict:
    return dict(num_layers=32, num_blocks=-(-max_tokens // 16) + 64, block_size=16, num_kv_heads=8, head_size=128)


def build(layout: str, dtype: str, shape: dict, seed: int) -> tuple[list[torch.Tensor], object]:
    """A cache on cuda:0 filled from a seeded CUDA generator (same bytes in every process)."""
    tensors, spec = make_kv_caches(layout, dtype=dtype, device=DEV, fill="empty", **shape)
    g = torch.Generator(device=DEV).manual_seed(seed)
    for t in tensors:
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, device=DEV, generator=g))
    return tensors, spec


def expected(layout: str, before: list[torch.Tensor], src_cache: list[torch.Tensor], src, dst) -> list[torch.Tensor]:
    bd = BLOCK_DIM.get(layout, 0)
    s = torch.as_tensor(np.asarray(src), dtype=torch.long, device=DEV)
    d = torch.as_tensor(np.asarray(dst), dtype=torch.long, device=DEV)
    out = []
    for b, p in zip(before, src_cache):
        e = b.view(torch.uint8).clone()
        e.index_copy_(bd, d, p.view(torch.uint8).index_select(bd, s))
        out.append(e)
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ P
def run_p(configs: list[dict]) -> None:
    transports = []
    for c in configs:
        tensors, spec = build(c["layout"], c["dtype"], c["shape"], c["seed"])
        tr = get_transport("ucx", timeout=60, path=c["path"], staging_bytes=c.get("staging") or None)
        tr.register(tensors, spec)
        transports.append((tr, tensors))
        print(f"ADDR {tr.address}", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    for tr, _ in transports:
        tr.close()


# ------------------------------------------------------------------------------------------ D
class PeerP:
    """P as a child process with UCX_PROTO_INFO=y; its other output lines are kept for the report."""

    def __init__(self, configs: list[dict]):
        env = {**os.environ, "UCX_PROTO_INFO": "y", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "p", json.dumps(configs)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.addrs: list[str] = []
        for _ in configs:
            while True:
                line = self.proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError("P exited early:\n" + "".join(self.lines[-40:]))
                if line.startswith("ADDR "):
                    self.addrs.append(line[5:].strip())
                    break
                self.lines.append(line)
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    def stop(self) -> None:
        try:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.reader.join(timeout=5)

    def proto_tables(self) -> list[str]:
        """The UCX_PROTO_INFO tables P printed for its puts and tag messages."""
        out, keep = [], 0
        for line in self.lines:
            text = re.sub(r"ucp_context_\d+", "ucp_context", re.sub(r"^(\s*\[[^]]*\])*", "", line)).strip()
            if "ucp_put" in text or "ucp_tag_send" in text or "ucp_get" in text:
                keep = 6
            if keep and text.startswith("|"):
                if text not in out:
                    out.append(text)
                keep -= 1
        return out


def check_layouts(p: PeerP, configs: list[dict], rng: np.random.Generator) -> list[dict]:
    """Every layout and dtype, read and write, per path; a path that fails twice is not tried further."""
    rows, failures = [], {}
    for c, addr in zip(configs, p.addrs):
        if failures.get(c["path"], 0) >= 2:
            rows.append({"path": c["path"], "layout": c["layout"], "dtype": c["dtype"], "skipped": True})
            continue
        try:
            rows.append(check_one(c, addr, rng))
        except Exception as e:  # noqa: BLE001 - record it, go on with the rest
            failures[c["path"]] = failures.get(c["path"], 0) + 1
            rows.append({"path": c["path"], "layout": c["layout"], "dtype": c["dtype"], "read_exact": False,
                         "write_exact": False, "error": f"{type(e).__name__}: {e}"})
        r = rows[-1]
        print(f"  {c['path']:>6} {c['layout']:>12} {c['dtype']:>5}: read {'ok' if r.get('read_exact') else 'MISMATCH'}, "
              f"write {'ok' if r.get('write_exact') else 'MISMATCH'} {r.get('error', '')}", flush=True)
    return rows


def check_one(c: dict, addr: str, rng: np.random.Generator) -> dict:
    mine, spec = build(c["layout"], c["dtype"], c["shape"], c["seed"] + 1000)
    theirs, _ = build(c["layout"], c["dtype"], c["shape"], c["seed"])
    nb = c["shape"]["num_blocks"]
    with get_transport("ucx", timeout=15, path=c["path"]) as tr:
        tr.register(mine, spec)
        peer = tr.connect(addr)
        n = int(rng.integers(1, nb // 2))
        src, dst = rng.choice(nb, n, replace=False), rng.choice(nb, n, replace=False)
        before = [t.clone() for t in mine]
        tr.read(peer, plan_segments(peer.spec, spec, src, dst), "check-read").wait(30)
        sync()
        read_ok = same(mine, expected(c["layout"], before, theirs, src, dst))
        # write D's blocks a into P's blocks b, read b back into D's blocks cc: cc must equal a
        a, b, cc = np.split(rng.permutation(nb)[:12], 3)
        tr.write(peer, plan_segments(spec, peer.spec, a, b), "check-write").wait(30)
        tr.read(peer, plan_segments(peer.spec, spec, b, cc), "check-readback").wait(30)
        sync()
        bd = BLOCK_DIM.get(c["layout"], 0)
        ia, ic = (torch.as_tensor(x, device=DEV) for x in (a, cc))
        write_ok = all(torch.equal(t.view(torch.uint8).index_select(bd, ia), t.view(torch.uint8).index_select(bd, ic))
                       for t in mine)
    return {"path": c["path"], "layout": c["layout"], "dtype": c["dtype"], "blocks": n, "read_exact": read_ok,
            "write_exact": write_ok}


def timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def bench(p: PeerP, cfg: dict, addr: str, tokens_list: list[int], iters: int, rng: np.random.Generator,
          on_row: Any = None) -> list[dict]:
    mine, spec = build(cfg["layout"], cfg["dtype"], cfg["shape"], cfg["seed"] + 1000)
    theirs, _ = build(cfg["layout"], cfg["dtype"], cfg["shape"], cfg["seed"])
    nb = cfg["shape"]["num_blocks"]
    rows = []
    with get_transport("ucx", timeout=120, path=cfg["path"], staging_bytes=cfg.get("staging") or None) as tr:
        tr.register(mine, spec)
        peer = tr.connect(addr)
        print(f" path {tr.path}" + (f", {cfg['staging'] >> 20} MiB slots:" if cfg.get("staging") else ":"), flush=True)
        for tokens in tokens_list:
            nblk = -(-tokens // cfg["shape"]["block_size"])
            plans = []
            for _ in range(iters + 1):
                src, dst = rng.choice(nb, nblk, replace=False), rng.choice(nb, nblk, replace=False)
                plans.append((src, dst, plan_segments(peer.spec, spec, src, dst)))
            before = [t.clone() for t in mine] if tokens == tokens_list[-1] or tokens <= 4096 else None
            it = iter(plans)
            lat = timed(lambda: tr.read(peer, next(it)[2], f"bench-{tokens}").wait(120), iters + 1)[1:]
            ok = None
            if before is not None:
                exp = expected(cfg["layout"], before, theirs, plans[0][0], plans[0][1])
                for s_, d_, _ in plans[1:]:
                    exp = expected(cfg["layout"], exp, theirs, s_, d_)
                ok = same(mine, exp)
                del exp, before
            nbytes = plans[-1][2].nbytes
            base, t_base = [], time.perf_counter()
            while len(base) < iters + 1 and (len(base) < 2 or time.perf_counter() - t_base < 20):
                base.append(tr.baseline(peer, nbytes, 1))
            base = base[1:]
            a = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
            b = torch.empty_like(a)
            d2d = timed(lambda: b.copy_(a), iters + 1)[1:]
            del a, b
            gbps = nbytes / statistics.median(lat) / 1e9
            row = {"path": tr.path, "staging_mib": (cfg.get("staging") or 0) >> 20, "tokens": tokens, "bytes": nbytes, "segments": len(plans[-1][2]), "gbps": round(gbps, 3),
                   "ucxx_contiguous_gbps": round(nbytes / statistics.median(base) / 1e9, 3),
                   "d2d_copy_gbps": round(nbytes / statistics.median(d2d) / 1e9, 3),
                   "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
                   "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3), "verified": ok}
            row["ratio_vs_ucxx"] = round(gbps / row["ucxx_contiguous_gbps"], 4)
            row["ratio_vs_d2d"] = round(gbps / row["d2d_copy_gbps"], 4)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            print(f"  {tokens:>6} tokens {nbytes / 2**20:9.1f} MiB {row['segments']:>7} segs: {gbps:8.2f} GB/s "
                  f"(ucxx contiguous {row['ucxx_contiguous_gbps']:8.2f}, d2d copy {row['d2d_copy_gbps']:8.2f}) "
                  f"p50 {row['p50_ms']:.2f} ms verified={ok}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--role", choices=["p"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048, 4096, 32768])
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--paths", nargs="+", default=["staged", "put"], help="ucx data paths to check and time")
    ap.add_argument("--staging-mib", type=int, nargs="+", default=[256], help="staging slot sizes to time (staged)")
    args, rest = ap.parse_known_args()
    if args.role == "p":
        run_p(json.loads(args.out if args.out else rest[0]))
        return 0
    if not args.out:
        ap.error("give the output folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))  # a `timeout` still writes what was measured
    from p2pkv.transport.ucx import describe
    info = {"device": torch.cuda.get_device_name(0) if DEV.startswith("cuda") else "cpu", "torch": torch.__version__, "describe": describe()}
    print(json.dumps(info, indent=1), flush=True)
    if "staged" in args.paths and DEV.startswith("cuda"):
        from p2pkv import kernels
        info["kernels"] = "loaded" if kernels.available() else f"unavailable: {kernels.unavailable_reason()}"
        print(f"p2pkv CUDA kernels: {info['kernels']}", flush=True)
        if not kernels.available():
            args.paths = [p for p in args.paths if p != "staged"]
    checks = [{"layout": lay, "dtype": dt, "shape": SMALL, "seed": i, "path": path} for path in args.paths
              for i, (lay, dt) in enumerate((lay, dt) for lay in PRESETS for dt in DTYPES)]
    perfs = [{"layout": "vllm", "dtype": "bf16", "shape": perf_shape(max(args.tokens)), "seed": 99, "path": path,
              "staging": mib << 20} for path in args.paths for mib in (args.staging_mib if path == "staged" else [0])]
    rng = np.random.default_rng(0)
    t0 = time.time()
    p = PeerP(checks + perfs)
    info["results"] = []
    try:
        print(f"P ready after {time.time() - t0:.1f} s; byte-exact checks (2 processes on {DEV}):", flush=True)
        info["checks"] = check_layouts(p, checks, rng)
        print(f"reads, default shape (32 layers, 8 kv heads, head 128, block 16, bf16) at {time.time() - t0:.1f} s:",
              flush=True)
        def save(row: dict) -> None:
            (out / "ucx_gpu.json").write_text(json.dumps({**info, "partial": True, "results": info["results"] + [row]},
                                                         indent=1))
        for cfg, addr in zip(perfs, p.addrs[len(checks):]):
            if not any(c["path"] == cfg["path"] and c.get("read_exact") for c in info["checks"]):
                print(f" path {cfg['path']}: not timed, its checks failed", flush=True)
                continue
            try:
                info["results"] += bench(p, cfg, addr, sorted(args.tokens), args.iters, rng, save)
            except Exception as e:  # noqa: BLE001
                info.setdefault("errors", []).append(f"{cfg['path']}: {type(e).__name__}: {e}")
                print(f" path {cfg['path']} failed: {type(e).__name__}: {e}", flush=True)
    finally:
        p.stop()
        info["proto_info"] = p.proto_tables()
        (out / "p.log").write_text("".join(p.lines)[-4_000_000:])
        print("UCX_PROTO_INFO (P, the side that puts):\n  " + "\n  ".join(info["proto_info"]), flush=True)
        (out / "ucx_gpu.json").write_text(json.dumps(info, indent=1))
    print(f"done after {time.time() - t0:.1f} s", flush=True)
    ok = all(c.get("read_exact") and c.get("write_exact") for c in info["checks"]) and \
        all(r["verified"] is not False for r in info["results"])
    print("ALL BYTE-EXACT" if ok else "MISMATCH FOUND", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
