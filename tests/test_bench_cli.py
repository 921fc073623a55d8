"""`p2pkv bench` and `p2pkv doctor` as a user runs them: table, JSON contract, verification that can fail."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from p2pkv.bench import PBusyLoad, busy, cache, requests
from p2pkv.cli import build_parser
from p2pkv.segments import Segments
from p2pkv.transport import get_transport

FIELDS = {"backend", "device", "layout", "dtype", "tokens", "requests", "bytes", "gbps", "baseline_gbps", "ratio",
          "p50_ms", "p99_ms", "verified"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["vllm", "cross_layer"])
def test_bench_runs_verifies_and_writes_the_json_contract(tmp_path, layout):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "p2pkv", "bench", "--layers", "3", "--tokens", "40", "100",
                           "--requests", "2", "--iters", "2", "--layout", layout, "--json", str(out)],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "GB/s" in proc.stdout and "verified" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["layers"] == 3 and data["config"]["tokens"] == [40, 100]
    rows = data["results"]
    assert [r["tokens"] for r in rows] == [40, 100]
    for r in rows:
        assert FIELDS <= set(r)
        assert r["verified"] is True and r["layout"] == layout
        assert r["bytes"] == -(-r["tokens"] // 16) * 16 * 8 * 128 * 2 * 2 * 3
        assert r["ratio"] == pytest.approx(r["gbps"] / r["baseline_gbps"], rel=1e-2)
    assert "iteration" in proc.stderr  # progress
    assert "P: allocating and filling" in proc.stderr and "D: allocating and filling" in proc.stderr
    for heading in ("segs ", "base GB/s ", "ratio ", "p50/p99 ms ", "verified "):  # the legend under the table
        assert heading in proc.stdout


CONNECTOR = ["bench", "--connector", "--layers", "2", "--kv-heads", "2", "--head-size", "32", "--tokens", "16", "64",
             "--producers", "2", "--iters", "2", "--warmup", "1"]


@pytest.mark.timeout(120)
def test_connector_bench_compares_loads_with_bare_reads_and_survives_a_frozen_producer(tmp_path):
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, "-m", "p2pkv", *CONNECTOR, "--concurrency", "1", "4", "--freeze-one",
                           "--load-timeout", "2", "--json", str(out)], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "bare p50" in proc.stdout and "frozen: others p50" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert [(r["tokens"], r["concurrency"]) for r in rows] == [(16, 1), (16, 4), (64, 1), (64, 4)]
    for r in rows:
        assert r["verified"] is True and r["load_failures"] == 0 and r["frozen_others_failures"] == 0
        assert r["load_p50_ms"] > 0 and r["bare_p50_ms"] > 0
        assert r["frozen_own_loads"] > 0 and r["frozen_own_failed"] == r["frozen_own_loads"]


@pytest.mark.parametrize("extra, message", [(["--option", "timeout=5"], "without --option"),
                                            (["--backend", "tcp,nccl"], "one --backend"),
                                            (["--tokens", "200000", "--concurrency", "64"], "GiB of D cache")])
def test_connector_bench_refuses_what_it_cannot_run(extra, message):
    proc = subprocess.run([sys.executable, "-m", "p2pkv", *CONNECTOR, *extra], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_verification_detects_a_corrupted_or_stray_byte():
    args = build_parser().parse_args(["bench", "--layers", "2", "--tokens", "32", "--requests", "1"])
    d_tensors, _ = cache.build(args, "cpu", cache.D_SEED + args.seed)
    p_tensors, _ = cache.build(args, "cpu", cache.P_SEED + args.seed)
    bd = cache.block_dim(args.layout)
    for t, p in zip(d_tensors, p_tensors):
        t.index_copy_(bd, torch.tensor([3, 0]), p.index_select(bd, torch.tensor([1, 2])))
    assert cache.verify(args, d_tensors, {3: 1, 0: 2})
    d_tensors[1].view(torch.uint8).view(-1)[7] ^= 1
    assert not cache.verify(args, d_tensors, {3: 1, 0: 2})


@pytest.mark.parametrize("argv", [["bench", "--tokens", "0"], ["bench", "--layout", "nope"], ["bench", "--dtype", "int4"],
                                  ["bench", "--option", "novalue"]])
def test_bad_arguments_fail_with_a_message(argv):
    proc = subprocess.run([sys.executable, "-m", "p2pkv", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() and "Traceback" not in proc.stderr


def test_doctor_reports_backends():
    proc = subprocess.run([sys.executable, "-m", "p2pkv", "doctor", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    r = json.loads(proc.stdout)
    assert r["backends"]["tcp"]["ok"] and set(r["backends"]) >= {"tcp", "nccl", "ucx", "cuda_ipc"}
    assert r["backends"]["tcp"]["version"].startswith("p2pkv ")
    if sys.platform.startswith("linux") and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert r["transparent_huge_pages"] in ("always", "madvise", "never")


def test_doctor_prints_one_readable_line_per_backend():
    proc = subprocess.run([sys.executable, "-m", "p2pkv", "doctor"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    lines = proc.stdout.splitlines()
    backends = lines[lines.index("backends:") + 1:]
    assert [ln.split()[0] for ln in backends[:4]] == ["tcp", "nccl", "ucx", "cuda_ipc"]
    for line in backends[:4]:
        assert line.split()[1] in ("yes", "no") and len(line) < 200 and "{" not in line, line
    tcp, nccl, ucx, cuda_ipc = backends[:4]
    assert tcp.split()[1] == "yes" and "[p2pkv " in tcp
    assert "[torch " in nccl
    if not torch.cuda.is_available():
        assert cuda_ipc.split()[1] == "no" and "no CUDA device visible" in cuda_ipc
        assert "CUDA memory" not in ucx and "cuda_support" not in ucx
    if ucx.split()[1] == "yes":
        assert "[ucxx " in ucx and "UCX transports" in ucx


@pytest.mark.timeout(180)
def test_bench_under_torchrun_rank0_is_p_and_writes_the_json(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "p2pkv", "bench",
                           "--layers", "2", "--tokens", "64", "--iters", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 1 and rows[0]["verified"] is True and rows[0]["backend"] == "tcp"
    assert [ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()].count("backend") == 1  # rank 0's table only


SMALL = ["--layers", "2", "--tokens", "32", "--requests", "1", "--iters", "1", "--warmup", "0"]


def _bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pkv", "bench", *SMALL, *argv], capture_output=True, text=True,
                          timeout=90)


@pytest.mark.parametrize("argv,says", [(["--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
                                       (["--requests", "0"], "argument --requests: must be at least 1"),
                                       (["--iters", "0"], "argument --iters: must be at least 1"),
                                       (["--block-size", "-16"], "argument --block-size: must be at least 1"),
                                       (["--layers", "0"], "argument --layers: must be at least 1"),
                                       (["--warmup", "-1"], "argument --warmup: must be at least 0"),
                                       (["--seed", "-1"], "argument --seed: must be at least 0"),
                                       (["--timeout", "0"], "argument --timeout"),
                                       (["--timeout", "inf"], "argument --timeout"),
                                       (["--timeout", "nan"], "argument --timeout")])
def test_a_bad_number_names_its_flag_and_the_allowed_range(argv, says):
    proc = _bench(*argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert says in proc.stderr


def _last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,line", [
    (["--backend", "loopback"], "p2pkv bench: error: --backend loopback: it has no raw link to measure a baseline "
                                "against (loopback is an in-process test double); choose from cuda_ipc, nccl, tcp, ucx"),
    (["--backend", "tcp,nope"], "p2pkv bench: error: --backend nope: no such transport; choose from cuda_ipc, nccl, "
                                "tcp, ucx"),
    (["--dtype", "int8"], "p2pkv bench: error: argument --dtype: invalid choice: 'int8' (choose from 'bf16', 'fp16', "
                          "'fp32', 'fp8')"),
    (["--tokens", "x"], "p2pkv bench: error: argument --tokens: expected an integer, got 'x'"),
    (["--timeout", "soon"], "p2pkv bench: error: argument --timeout: expected a number of seconds, got 'soon'"),
])
def test_a_mistake_ends_in_one_error_line_before_the_run(argv, line):
    proc = _bench(*argv)
    assert proc.returncode == 2 and _last_line(proc) == line
    assert "allocating" not in proc.stderr and not proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_error_line():
    proc = _bench("--device", "cuda")
    assert proc.returncode == 2
    assert _last_line(proc) == "p2pkv bench: error: --device cuda: torch sees no CUDA device here; use --device cpu"
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_cache_too_big_for_memory_is_refused_before_allocating():
    proc = _bench("--tokens", "100000000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "memory" in proc.stderr and "lower --tokens" in proc.stderr
    assert "allocate" not in proc.stderr


@pytest.mark.parametrize("layout", ["vllm", "vllm_cpu", "block_first", "mla", "cross_layer"])
def test_cache_size_estimate_matches_the_allocation(layout):
    args = build_parser().parse_args(["bench", "--layers", "3", "--tokens", "40", "--kv-heads", "2", "--head-size", "8",
                                      "--layout", layout])
    tensors, _ = cache.build(args, "cpu", 0)
    total, largest = cache.cache_bytes(args)
    assert total == sum(t.nbytes for t in tensors) and largest == max(t.nbytes for t in tensors)


@pytest.mark.parametrize("argv,says", [(["--option", "bogus=1"], "staging_bytes"),
                                       (["--option", "=5"], "KEY=VALUE"),
                                       (["--option", "staging_bytes=abc"], "--option staging_bytes='abc'"),
                                       (["--option", "timeout=abc"], "--option timeout='abc'"),
                                       (["--backend", "nccl", "--option", "pack_threshold=abc"], "pack_threshold='abc'"),
                                       (["--backend", ","], "--backend names no transport")])
def test_a_bad_backend_or_option_is_named_before_the_run(argv, says):
    proc = _bench(*argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert says in proc.stderr and "iteration" not in proc.stderr


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_an_output_path_in_a_missing_folder_fails_before_the_run(tmp_path, flag):
    proc = _bench(flag, str(tmp_path / "missing" / "r.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr and "iteration" not in proc.stderr


def test_a_plot_format_matplotlib_cannot_write_fails_before_the_run(tmp_path):
    pytest.importorskip("matplotlib")
    proc = _bench("--plot", str(tmp_path / "r.out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot write .out" in proc.stderr and "png" in proc.stderr and "iteration" not in proc.stderr


BUSY_FIELDS = {"idle_p50_ms", "p_busy_thread_p50_ms", "p_busy_proc_p50_ms", "p_busy_ratio", "d_engine_p50_ms",
               "d_engine_ratio", "d_engine_target_ms", "busy_slice_ms"}


@pytest.mark.timeout(150)
def test_busy_mode_measures_every_case_on_real_processes_and_verifies_them(tmp_path):
    out = tmp_path / "busy.json"
    proc = subprocess.run([sys.executable, "-m", "p2pkv", "bench", "--busy", "--layers", "2", "--tokens", "32",
                           "--requests", "2", "--iters", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["config"]["busy"] is True
    [row] = data["results"]
    assert FIELDS | BUSY_FIELDS <= set(row)
    assert all(row[f] > 0 for f in BUSY_FIELDS), row
    assert row["verified"] is True and row["idle_p50_ms"] == row["p50_ms"]
    for case in ("p_busy_thread", "p_busy_proc", "d_engine"):
        assert f"{case} p50" in proc.stderr
    for heading in ("P thread ms", "P proc ms", "D loop ms", "D target ms"):
        assert heading in proc.stdout
    assert "does not match" not in proc.stderr


class _DropReadsWhenProcessBusy:
    """A transport wrapper whose reads move nothing (yet complete) while P's load is the separate process."""

    def __init__(self, tr):
        self.tr, self.modes = tr, []

    def ask_p(self, mode):
        self.modes.append(mode)

    def read(self, peer, segs, request_id=None):
        if self.modes and self.modes[-1] == "process":
            segs = Segments.empty()
        return self.tr.read(peer, segs, request_id=request_id)


def test_a_busy_case_whose_reads_move_nothing_is_reported_unverified():
    args = build_parser().parse_args(["bench", "--busy", "--layers", "2", "--tokens", "32", "--requests", "2",
                                      "--iters", "1", "--warmup", "0"])
    p_tensors, p_spec = cache.build(args, "cpu", cache.P_SEED + args.seed)
    d_tensors, d_spec = cache.build(args, "cpu", cache.D_SEED + args.seed)
    with get_transport("loopback") as p, get_transport("loopback") as d:
        p.register(p_tensors, p_spec)
        d.register(d_tensors, d_spec)
        peer = d.connect(p.address)
        plan = requests.plan(args, np.random.default_rng(0), peer.spec, d_spec, 32)
        for reqs in plan:
            for req in reqs:
                d.read(peer, req.segs).wait(10)
        dropping = _DropReadsWhenProcessBusy(d)
        cases = busy.BusyCases(dropping, peer, args, "loopback", 32, plan, d_tensors, dropping.ask_p)
        fields = cases.measure(idle_p50_ms=1.0)
    assert dropping.modes == ["thread", "idle", "process", "idle"]
    assert fields["verified"] is False
    assert cache.verify(args, d_tensors, {})  # each case ends with D's initial cache restored


def test_p_busy_load_runs_a_spinning_thread_or_process_and_stops_it():
    with PBusyLoad() as load:
        load.set("thread")
        spinners = [t for t in threading.enumerate() if t.name == "p2pkv-bench-busy"]
        assert len(spinners) == 1 and spinners[0].is_alive()
        load.set("process")
        assert not spinners[0].is_alive()
        child = load._proc
        assert child is not None and child.poll() is None
        with pytest.raises(ValueError, match="none of idle, thread, process"):
            load.set("busy")
        assert child.poll() is None
    assert child.returncode is not None and load._proc is None


def test_filling_a_large_cache_says_how_far_it_got(monkeypatch, capsys):
    monkeypatch.setattr(cache, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(cache, "FILL_CHUNK", 1 << 16)
    args = build_parser().parse_args(["bench", "--layers", "1", "--tokens", "64", "--layout", "cross_layer"])
    cache.build(args, "cpu", 0, side="P")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[p2pkv bench] P: allocating and filling 1.5 MiB of KV cache on cpu"
    assert "[p2pkv bench] P: filled 0.1 MiB of 1.5 MiB" in lines and len(lines) > 3  # within one tensor


@pytest.mark.timeout(120)
def test_ctrl_c_ends_in_one_line_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "p2pkv", "bench", "--layers", "2", "--tokens", "256",
                             "--iters", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "iteration" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert rest.strip().splitlines()[-1] == "p2pkv bench: interrupted" and "Traceback" not in rest, rest
