#!/usr/bin/env bash
# Sixteenth session's fourth GPU call (issue 3), outputs straight into $OUT (about 6 minutes):
# 1. bench v20: `ftmoe bench --prefill-graphs --no-latency` with the TMA GEMV (up to 16 rows),
#    the routed expert GEMV (1-2 slots), Wo in 4 K splits and 16-warp add_layernorm as defaults;
# 2. A/B of the new defaults against the fifteenth session's (register GEMV tiles up to 8 rows,
#    fused-MoE experts, Wo in 16 splits, 4-warp LN), each step timed alone (--synced) and back to back;
# 3. the GPU tests of what changed (GEMV forms, routed experts, LN, graph replay, greedy chunks);
# 4. scripts/critical_path.py at batches 1 and 8 with the new defaults.
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round31.txt).
# Usage: OUT=dir bash scripts/gpu_round31.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 240 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill)|rror" "$OUT/bench.txt"
OLD=gemvtma=0,gemvexperts=0,wosplits=0,lnwarps=4
timeout 120 python3 scripts/ab_decode.py --batches 1,8 --synced --rounds 5 --json "$OUT/ab_synced.json" \
    --variants base $OLD > "$OUT/ab_synced.txt" 2>&1
echo "[ab synced rc $? at ${SECONDS}s]"; grep "^B=" "$OUT/ab_synced.txt"
timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 5 --json "$OUT/ab.json" \
    --variants base $OLD > "$OUT/ab.txt" 2>&1
echo "[ab rc $? at ${SECONDS}s]"; grep "^B=" "$OUT/ab.txt"
timeout 60 python3 scripts/ab_decode.py --batches 16 --rounds 5 --variants base gemv=0,lnwarps=4 > "$OUT/ab16.txt" 2>&1
echo "[ab16 rc $? at ${SECONDS}s]"; grep "^B=" "$OUT/ab16.txt"   # at 16 the old defaults ran no GEMV
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "gemv or layernorm or cuda_graph_replay or greedy_chunk or ab_switches" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
timeout 80 python3 scripts/critical_path.py --batches 1,8 --reps 10 > "$OUT/critical.txt" 2>&1
echo "[critical path rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/critical.txt" | head -30
