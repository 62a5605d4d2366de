#!/usr/bin/env bash
# Twenty-third session's GPU call for a 2-GPU host (greedy chunks on the parallel runner; ~8 min),
# outputs in $OUT/round47.tgz:
# 1. the GPU tests of the greedy-chunk kernels and graphs (the tensor-parallel argmax merge included);
# 2. NCCL parity on the tiny model, TP=2 / EP=2 / PP=2, reference and fast path: greedy generate now
#    runs in chunks without a pipeline (the line says how many), tokens equal to one GPU;
# 3. `ftmoe bench --distributed` at batches 1 / 8 / 64 for 1x1x1, TP=2, EP=2: the step row (rank 0's
#    host work per step in series with the GPUs) beside the greedy-chunk row (8 steps a broadcast).
# Usage: OUT=dir [SKIP_TESTS=1] bash scripts/gpu_round47.sh   (2 GPUs; also on more)
ROUND=round47
. scripts/gpu_env.sh
if [ -z "${SKIP_TESTS:-}" ]; then   # SKIP_TESTS=1: they ran on a one-GPU machine already
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
      -k "greedy" > "$W/tests.txt" 2>&1
  echo "[tests rc $? at ${SECONDS}s]"; tail -5 "$W/tests.txt" | grep -v "^$"; save tests
fi
timeout 150 python3 scripts/gpu_parallel_check.py --tiny --layouts 2x1x1,1x2x1,1x1x2 > "$W/parity.txt" 2>&1
echo "[parity rc $? at ${SECONDS}s]"; grep -E "NCCL|rror" "$W/parity.txt"; save parity
for L in 1x1x1 2x1x1 1x2x1; do
  IFS=x read -r tp ep pp <<< "$L"
  timeout 110 python3 -m ftmoe.cli bench --distributed --tp "$tp" --ep "$ep" --pp "$pp" --batches 1,8,64 \
      --prefill none --iters 20 --greedy-chunk 8 --json "$W/bench_$L.json" > "$W/bench_$L.txt" 2>&1
  echo "[bench $L rc $? at ${SECONDS}s]"; grep -E "^decode|rror" "$W/bench_$L.txt"; save "bench_$L"
done
