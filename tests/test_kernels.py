"""Segment copies (p2pkv.kernels): the torch fallback against a numpy byte reference
on every layout and dtype (CPU, in CI), and the CUDA extension against the fallback
on poisoned outputs (GPU machine only)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from p2pkv import kernels
from p2pkv.layout import PRESETS, make_kv_caches, plan_segments
from p2pkv.transport.base import byte_regions

DTYPES = ["float16", "bfloat16", "float32", "int8"] + (["float8_e4m3fn"] if hasattr(torch, "float8_e4m3fn") else [])
POISON = 0xA5

CUDA = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(not CUDA or kernels.load() is None,
                               reason="needs a CUDA device and the built extension "
                                      f"({kernels.unavailable_reason() if CUDA else 'no CUDA device here'})")


def _case(layout: str, dtype: str, device: str, seed: int, head_size: int = 8, blocks: int = 24, moved: int = 9):
    g = torch.Generator().manual_seed(seed)
    src_t, spec = make_kv_caches(layout, num_layers=3, num_blocks=blocks, block_size=4, num_kv_heads=2,
                                 head_size=head_size, dtype=dtype, device=device, fill="random", generator=g)
    dst_t, dspec = make_kv_caches(layout, num_layers=3, num_blocks=blocks, block_size=4, num_kv_heads=2,
                                  head_size=head_size, dtype=dtype, device=device, fill="empty")
    for r in byte_regions(dst_t, dspec):
        r.fill_(POISON)
    rng = np.random.default_rng(seed)
    sb = rng.choice(blocks, moved, replace=False)
    db = rng.choice(blocks, moved, replace=False)
    segs = plan_segments(spec, dspec, sb, db)
    return byte_regions(src_t, spec), byte_regions(dst_t, dspec), segs, (src_t, dst_t, sb, db)


def _np(regions):
    return [r.cpu().numpy().copy() for r in regions]


def _reference_copy(src, dst, segs):
    out = [d.copy() for d in dst]
    for r, s, d, n in zip(segs.region.tolist(), segs.src.tolist(), segs.dst.tolist(), segs.length.tolist()):
        out[r][d:d + n] = src[r][s:s + n]
    return out


def _reference_gather(src, region, off, length):
    return np.concatenate([src[r][o:o + n] for r, o, n in zip(region.tolist(), off.tolist(), length.tolist())])


def _block_check(layout, src_t, dst_t, sb, db):
    bdim = 1 if layout == "vllm" else 0
    for s, d in zip(src_t, dst_t):
        idx_s = torch.as_tensor(sb, device=s.device)
        idx_d = torch.as_tensor(db, device=s.device)
        assert torch.equal(d.view(torch.uint8).index_select(bdim, idx_d), s.view(torch.uint8).index_select(bdim, idx_s))


# ------------------------------------------------------------------------------------------ CPU: fallback

@pytest.mark.parametrize("layout", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_copy_gather_scatter_every_layout_and_dtype(layout, dtype):
    src, dst, segs, (src_t, dst_t, sb, db) = _case(layout, dtype, "cpu", seed=zlib.crc32(f"{layout}{dtype}".encode()) % 1000)
    src_np, dst_np = _np(src), _np(dst)
    kernels.copy_segments(src, dst, segs.region, segs.src, segs.dst, segs.length)
    want = _reference_copy(src_np, dst_np, segs)
    for got, exp in zip(_np(dst), want):
        assert np.array_equal(got, exp)
    _block_check(layout, src_t, dst_t, sb, db)

    buf = kernels.gather(src, segs.region, segs.src, segs.length)
    assert np.array_equal(buf.numpy(), _reference_gather(src_np, segs.region, segs.src, segs.length))
    for r in dst:
        r.fill_(POISON)
    kernels.scatter(buf, dst, segs.region, segs.dst, segs.length)
    for got, exp in zip(_np(dst), _reference_copy(src_np, _np(dst), segs)):
        assert np.array_equal(got, exp)


def test_fallback_unaligned_byte_segments():
    rng = np.random.default_rng(7)
    src = [torch.from_numpy(rng.integers(0, 256, 4099, dtype=np.uint8)) for _ in range(2)]
    dst = [torch.full((5003,), POISON, dtype=torch.uint8) for _ in range(2)]
    region = np.array([0, 1, 0, 1])
    so, do, ln = np.array([1, 3, 100, 4000]), np.array([7, 0, 2000, 17]), np.array([33, 1, 517, 99])
    want = [d.numpy().copy() for d in dst]
    for r, s, d, n in zip(region, so, do, ln):
        want[r][d:d + n] = src[r].numpy()[s:s + n]
    kernels.copy_segments(src, dst, region, so, do, ln)
    for got, exp in zip(dst, want):
        assert np.array_equal(got.numpy(), exp)


def test_fallback_errors_name_segment_and_region():
    src = [torch.zeros(64, dtype=torch.uint8)]
    dst = [torch.zeros(32, dtype=torch.uint8)]
    with pytest.raises(ValueError, match=r"segment 1: destination bytes \[20, 40\) run past the end of destination region 0"):
        kernels.copy_segments(src, dst, [0, 0], [0, 0], [0, 20], [4, 20])
    with pytest.raises(ValueError, match="names source region 3, but only 1 are registered"):
        kernels.copy_segments(src, dst, [3], [0], [0], [4])
    with pytest.raises(ValueError, match="gather output holds 8 bytes"):
        kernels.gather(src, [0], [0], [16], out=torch.empty(8, dtype=torch.uint8))


def test_no_cuda_means_fallback_with_reason():
    if CUDA:
        pytest.skip("this machine has CUDA")
    assert not kernels.available()
    assert "no CUDA device" in (kernels.unavailable_reason() or "")


# ------------------------------------------------------------------------------------------ GPU: extension vs fallback

def _fallback_copy(src, dst, segs):
    kernels._fallback(kernels.Regions.of(src), kernels.Regions.of(dst), kernels._i64(segs.region),
                      kernels._i64(segs.src), kernels._i64(segs.dst), kernels._i64(segs.length), None)


TABLE_MODES = [(1, 2, None), (0, 0, None), (0, 1, None), (0, 3, 37)]  # small tables in parameters, hint, table_rows


@pytest.fixture(params=TABLE_MODES, ids=lambda m: f"small={m[0]}-hint={m[1]}-rows={m[2]}")
def tuning(request, monkeypatch):
    small, hint, rows = request.param
    monkeypatch.setitem(kernels.TUNING, "small", bool(small))
    monkeypatch.setitem(kernels.TUNING, "hint", hint)
    monkeypatch.setitem(kernels.TUNING, "table_rows", rows)
    return request.param


@needs_ext
@pytest.mark.gpu
@pytest.mark.parametrize("layout", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_copy_matches_fallback(layout, dtype, tuning):
    for head_size, blocks, moved in ((8, 24, 9), (3, 300, 200)):
        src, dst, segs, (src_t, dst_t, sb, db) = _case(layout, dtype, "cuda", seed=11, head_size=head_size,
                                                       blocks=blocks, moved=moved)
        ref = [r.clone() for r in dst]
        _fallback_copy(src, ref, segs)
        kernels.copy_segments(src, dst, segs.region, segs.src, segs.dst, segs.length)
        torch.cuda.synchronize()
        for got, exp in zip(dst, ref):
            assert torch.equal(got, exp)
        _block_check(layout, src_t, dst_t, sb, db)

        buf = torch.full((segs.nbytes + 64,), POISON, dtype=torch.uint8, device="cuda")
        kernels.gather(src, segs.region, segs.src, segs.length, out=buf)
        ref_buf = kernels.gather([r.cpu() for r in src], segs.region, segs.src, segs.length)
        torch.cuda.synchronize()
        assert torch.equal(buf[:segs.nbytes].cpu(), ref_buf)
        assert bool((buf[segs.nbytes:] == POISON).all())
        for r in dst:
            r.fill_(POISON)
        kernels.scatter(buf, dst, segs.region, segs.dst, segs.length)
        torch.cuda.synchronize()
        for got, exp in zip(dst, ref):
            assert torch.equal(got, exp)


@needs_ext
@pytest.mark.gpu
def test_cuda_unaligned_and_long_segments(tuning):
    g = torch.Generator().manual_seed(3)
    src = [torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g).cuda() for _ in range(3)]
    dst = [torch.full((3 << 20,), POISON, dtype=torch.uint8, device="cuda") for _ in range(3)]
    rng = np.random.default_rng(5)
    n = 3000
    region = rng.integers(0, 3, n)
    length = rng.integers(1, 700, n)
    length[:5] = [1 << 20, 300000, 16, 15, 17]
    dst_off = np.zeros(n, dtype=np.int64)
    for r in range(3):  # non-overlapping destinations per region, random source offsets and alignments
        idx = np.flatnonzero(region == r)
        dst_off[idx] = np.concatenate([[0], np.cumsum(length[idx] + rng.integers(0, 40, len(idx)))[:-1]])
    src_off = np.array([rng.integers(0, (3 << 20) - n_) for n_ in length])
    ref = [d.clone() for d in dst]
    kernels._fallback(kernels.Regions.of(src), kernels.Regions.of(ref), region, src_off, dst_off, length, None)
    kernels.copy_segments(src, dst, region, src_off, dst_off, length)
    torch.cuda.synchronize()
    for got, exp in zip(dst, ref):
        assert torch.equal(got, exp)


@needs_ext
@pytest.mark.gpu
def test_cuda_gather_into_pinned_host_and_scatter_from_it():
    src, dst, segs, _ = _case("vllm", "bfloat16", "cuda", seed=4, blocks=64, moved=40)
    host = torch.full((segs.nbytes,), POISON, dtype=torch.uint8, pin_memory=True)
    kernels.gather(src, segs.region, segs.src, segs.length, out=host)
    torch.cuda.synchronize()
    assert torch.equal(host, kernels.gather([r.cpu() for r in src], segs.region, segs.src, segs.length))
    ref = [r.clone() for r in dst]
    _fallback_copy(src, ref, segs)
    kernels.scatter(host, dst, segs.region, segs.dst, segs.length)
    torch.cuda.synchronize()
    for got, exp in zip(dst, ref):
        assert torch.equal(got, exp)


@needs_ext
@pytest.mark.gpu
def test_cuda_errors_are_value_errors():
    src = [torch.zeros(64, dtype=torch.uint8, device="cuda")]
    dst = [torch.zeros(32, dtype=torch.uint8, device="cuda")]
    with pytest.raises(ValueError, match=r"segment 1: destination bytes \[20, 40\) run past the end of destination region 0"):
        kernels.copy_segments(src, dst, [0, 0], [0, 0], [0, 20], [4, 20])
    with pytest.raises(ValueError, match="names source region 3"):
        kernels.copy_segments(src, dst, [3], [0], [0], [4])


# ------------------------------------------------------------------------------------------ CUDA: whole blocks

# min/max chunk, grid, hint (10: a warp per unit of 4 KiB and less, 2: a thread block per unit)
BLOCK_KNOBS = [(4096, 32768, 0, 10), (16, 16, 0, 10), (256, 1024, -1, 10), (4096, 65536, 7, 10), (16, 4096, 0, 2),
               (16, 4096, 0, 10), (64, 1024, -2, 11)]


@needs_ext
@pytest.mark.gpu
@pytest.mark.parametrize("layout", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knobs", BLOCK_KNOBS, ids=lambda k: f"chunk={k[0]}-{k[1]}-grid={k[2]}-hint={k[3]}")
def test_cuda_copy_blocks_matches_segments(layout, dtype, knobs, monkeypatch):
    from p2pkv.layout import block_geometry
    for key, v in zip(("block_min_chunk", "block_max_chunk", "block_grid", "hint"), knobs):
        monkeypatch.setitem(kernels.TUNING, key, v)
    # few pairs (parameters under 1 KiB), 200 pairs (the 32 KiB form), odd head sizes (byte path)
    for head_size, blocks, moved in ((8, 24, 9), (3, 300, 200), (128, 8, 1)):
        src, dst, segs, (src_t, dst_t, sb, db) = _case(layout, dtype, "cuda", seed=12, head_size=head_size,
                                                       blocks=blocks, moved=moved)
        ref = [r.clone() for r in dst]
        _fallback_copy(src, ref, segs)
        ss, ds, pieces = block_geometry(segs.plan.src_spec, segs.plan.dst_spec)
        table = kernels.BlockTable.build(kernels.Regions.of(src), kernels.Regions.of(dst), ss, ds, pieces)
        assert table is not None
        assert kernels.copy_blocks(table, sb, db) == segs.nbytes
        torch.cuda.synchronize()
        for got, exp in zip(dst, ref):
            assert torch.equal(got, exp)
        _block_check(layout, src_t, dst_t, sb, db)


@needs_ext
@pytest.mark.gpu
def test_cuda_copy_blocks_over_one_launch_worth_of_pairs():
    from p2pkv.layout import block_geometry
    src, dst, segs, (src_t, dst_t, sb, db) = _case("vllm", "bfloat16", "cuda", seed=13, head_size=2, blocks=9000,
                                                   moved=8500)
    ref = [r.clone() for r in dst]
    _fallback_copy(src, ref, segs)
    table = kernels.BlockTable.build(kernels.Regions.of(src), kernels.Regions.of(dst),
                                     *block_geometry(segs.plan.src_spec, segs.plan.dst_spec))
    kernels.copy_blocks(table, sb, db)
    torch.cuda.synchronize()
    for got, exp in zip(dst, ref):
        assert torch.equal(got, exp)


@needs_ext
@pytest.mark.gpu
def test_cuda_copy_blocks_refuses_ids_outside_the_registered_memory():
    from p2pkv.layout import block_geometry
    src, dst, segs, _ = _case("block_first", "float16", "cuda", seed=14, blocks=24, moved=3)
    small_dst = [r[: r.numel() // 2] for r in dst]  # only the first 12 blocks are registered here
    table = kernels.BlockTable.build(kernels.Regions.of(src), kernels.Regions.of(small_dst),
                                     *block_geometry(segs.plan.src_spec, segs.plan.dst_spec))
    assert (table.max_src, table.max_dst) == (23, 11)
    before = [r.clone() for r in dst]
    with pytest.raises(ValueError, match=r"destination block id 12 is outside the registered memory \(ids 0..11\)"):
        kernels.copy_blocks(table, [0, 1], [3, 12])
    with pytest.raises(ValueError, match="source block id -1"):
        kernels.copy_blocks(table, [-1], [0])
    with pytest.raises(ValueError, match="differ in length"):
        kernels.copy_blocks(table, [0, 1], [0])
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


@pytest.mark.timeout(120)
def test_binding_compiles_against_the_installed_torch_headers(tmp_path):
    """The CPU machines cannot load the extension, but they can compile its binding, so a C++ error
    fails here instead of on the GPU machine."""
    import os
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    from torch.utils import cpp_extension
    cxx = shutil.which("g++") or shutil.which("c++")
    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    cuda_home = next((h for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").is_file()), None)
    if cxx is None or cuda_home is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (CUDA_HOME)")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", *[f"-I{p}" for p in cpp_extension.include_paths()],
           f"-I{cuda_home}/include", f"-I{csrc}", f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=p2pkv_cuda", str(csrc / "binding.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-4000:]
