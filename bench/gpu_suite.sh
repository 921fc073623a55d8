#!/usr/bin/env bash
# The whole GPU suite in one call (for the lent GPU machine): build the CUDA extension,
# run every GPU test, then the GPU benchmarks; logs and JSON land in $OUT (default ./gpu-out).
#   STEPS="build test kbench bench" bash bench/gpu_suite.sh      # choose steps; default: all
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export P2PKV_EXT_DIR=${P2PKV_EXT_DIR:-/tmp/p2pkv-ext}
PY=${PY:-python3}
STEPS=${STEPS:-"env native build test kbench pair busy tp8"}
TOKENS=${TOKENS:-"16 512 2048 4096"}
KTOKENS=${KTOKENS:-"16 512 2048 4096 32768"}
LOG=$OUT/suite.log
status=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log, remember failures
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

for s in $STEPS; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -1; \
           $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.device_count())'" ;;
    native) step native 120 "$PY" setup.py -q build_ext --inplace ;;
    build) step build 300 "$PY" -m p2pkv.kernels build ;;
    test) step test "${TEST_LIMIT:-240}" "$PY" -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernels.py tests/test_cuda_ipc.py \
            tests/test_nccl.py tests/test_tcp_cuda.py} ${TEST_K:+-k "$TEST_K"} ;;
    busy)  # idle vs P's engine thread busy vs D's engine loop, same requests (issue: transfers off the GIL)
      for b in ${BACKENDS:-cuda_ipc tcp}; do
        step "busy-$b" "${BENCH_LIMIT:-240}" "$PY" -m p2pkv bench --device cuda --backend "$b" --busy --tokens ${BUSY_TOKENS:-16 512 2048} \
          --requests "${REQUESTS:-4}" --iters "${ITERS:-10}" --warmup 2 --json "$OUT/busy_$b.json"
      done ;;
    tp8)  # small segments, Llama-3-70B at TP 8 (one KV head per rank: 4 KiB per block and K/V plane), cuda_ipc;
          # hint 10 (the default) copies each unit of 4 KiB and less with one warp, hint 2 with a thread block
      for h in ${TP8_HINTS:-10 2}; do
        step "tp8-hint$h" "${BENCH_LIMIT:-240}" env P2PKV_HINT="$h" "$PY" -m p2pkv bench --device cuda --backend cuda_ipc \
          --kv-heads 1 --block-size 16 --head-size 128 --layers 8 --tokens ${TP8_TOKENS:-512 2048 3000 8192} \
          --requests 2 --iters "${ITERS:-10}" --warmup 2 --json "$OUT/tp8_hint$h.json"
      done ;;
    kbench) step kbench 180 "$PY" bench/kernel_bench.py --tokens $KTOKENS --json "$OUT/kernel_bench.json" ;;
    pair)  # two processes, cuda_ipc and tcp on CUDA tensors, same-run baselines (bench/gpu_pair_bench.py)
      for b in ${BACKENDS:-cuda_ipc tcp}; do
        step "pair-$b" "${BENCH_LIMIT:-240}" "$PY" bench/gpu_pair_bench.py --backend "$b" --tokens $TOKENS \
          --requests "${REQUESTS:-40}" --json "$OUT/pair_$b.json"
      done
      step pair-breakdown 120 "$PY" bench/gpu_pair_bench.py --backend cuda_ipc --tokens 16 4096 --breakdown ;;
    bench)  # the lead's `p2pkv bench` (its D process aborted at exit here on 2026-11-25; see docs/gpu.md)
      for b in ${BACKENDS:-cuda_ipc tcp}; do
        step "bench-$b" "${BENCH_LIMIT:-240}" "$PY" -m p2pkv bench --device cuda --backend "$b" --tokens $TOKENS \
          --requests "${REQUESTS:-4}" --iters "${ITERS:-20}" --warmup 2 --json "$OUT/bench_$b.json"
      done ;;
    *) echo "unknown step $s" | tee -a "$LOG"; status=1 ;;
  esac
done
echo "=== suite exit $status" | tee -a "$LOG"
exit $status
