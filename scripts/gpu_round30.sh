#!/usr/bin/env bash
# Sixteenth session's third GPU call (issue 3), outputs straight into $OUT (about 7 minutes):
# 1. A/B at batches 1-8, back to back in one process (the TMA GEMV now the default): base against
#    FTMOE_GEMV_EXPERTS=1 (the MoE layer's expert W1 / W2 on the routed TMA GEMV: W1 reads its
#    slot's expert after its wait and lets W2 launch at once; W2 loads its expert's tiles before
#    its wait, while W1 runs), FTMOE_GEMV_WO_SPLITS=4 (Wo in 4 K splits: the LN after it sums 4
#    partials, not 16) and FTMOE_LN_WARPS=8 (the one-row LN with 8 warps);
# 2. the routed GEMV's GPU tests and the fast path's TMA / experts decode test;
# 3. scripts/critical_path.py with FTMOE_GEMV_EXPERTS=1 at batches 1 and 8;
# 4. the experts A/B at 16 rows and at 1 / 8 timed alone (--synced).
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round30.txt).
# Usage: OUT=dir bash scripts/gpu_round30.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 200 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 5 --json "$OUT/ab.json" \
    --variants base gemvexperts=1 wosplits=4 lnwarps=8 > "$OUT/ab.txt" 2>&1
echo "[ab rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab.txt" | tail -16
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "gemv_experts or gemv_tma or ab_switches" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/tests.txt" | head -20
FTMOE_GEMV_EXPERTS=1 timeout 80 python3 scripts/critical_path.py --batches 1,8 --reps 10 > "$OUT/critical.txt" 2>&1
echo "[critical path rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/critical.txt" | head -30
timeout 100 python3 scripts/ab_decode.py --batches 16 --rounds 5 --variants base gemvexperts=1 > "$OUT/ab16.txt" 2>&1
echo "[ab16 rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab16.txt" | tail -3
timeout 100 python3 scripts/ab_decode.py --batches 1,8 --synced --rounds 5 --variants base gemvexperts=1 > "$OUT/ab_synced.txt" 2>&1
echo "[ab synced rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab_synced.txt" | tail -5
