#!/usr/bin/env bash
# Sixteenth session's second GPU call (issue 3), outputs straight into $OUT (about 8 minutes):
# 1. A/B at batches 1-8, back to back in one process: base against FTMOE_GEMV_TMA=1 (the GEMVs'
#    weight tiles loaded by one TMA copy into shared memory before the PDL wait, c^T = w^T a^T on
#    wgmma: ~45-72 registers and 72 KB of shared memory a program, three programs per SM, where
#    the register form holds the dense W2's tile in 190 registers, one per SM, and fills the
#    QKV / W1 tiles four 16-byte loads at a time);
# 2. the GEMV's GPU tests (both forms, bf16 included) and the fast path's TMA decode test;
# 3. scripts/kernel_resources.py with the TMA form: registers and shared memory on the card;
# 4. scripts/critical_path.py with the TMA form at batches 1 and 8 (per-kernel advances);
# 5. the same A/B with each step timed alone (--synced, as the bench's decode rows).
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round29.txt).
# Usage: OUT=dir bash scripts/gpu_round29.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 170 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 5 --json "$OUT/ab_tma.json" \
    --variants base gemvtma=1 > "$OUT/ab_tma.txt" 2>&1
echo "[ab tma rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab_tma.txt" | tail -10
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "gemv" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/tests.txt" | head -20
timeout 60 python3 scripts/kernel_resources.py --batches 1,8 --env FTMOE_GEMV_TMA=1 > "$OUT/resources.txt" 2>&1
echo "[resources rc $? at ${SECONDS}s]"; grep -E "gemv|rror" "$OUT/resources.txt" | head -30
FTMOE_GEMV_TMA=1 timeout 90 python3 scripts/critical_path.py --batches 1,8 --reps 10 > "$OUT/critical_tma.txt" 2>&1
echo "[critical path rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/critical_tma.txt" | head -40
timeout 100 python3 scripts/ab_decode.py --batches 1,8 --synced --rounds 5 --json "$OUT/ab_tma_synced.json" \
    --variants base gemvtma=1 > "$OUT/ab_tma_synced.txt" 2>&1
echo "[ab tma synced rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab_tma_synced.txt" | tail -6
