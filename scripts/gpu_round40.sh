#!/usr/bin/env bash
# Nineteenth session's first GPU call (issue 3; ~6 min), outputs into $OUT: weights asked of the L2
# ahead of their readers by the kernels that leave HBM idle (`kernels/l2.py`, FTMOE_L2_AHEAD):
# 1. the GPU tests of the fetch paths (bit-equal steps, the share tiling, top-k, attention);
# 2. one-process A/B at batches 1-16 (the GEMV path), the base twice (lngate=auto launches what the
#    base launches);
# 3. the batch-1 critical path with every fetch on, against the base (`scripts/critical_path.py`).
# Ran once (nineteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round40.txt.
# The fetches were slower everywhere and their code is removed (see docs/NOTES.md): this no longer runs.
# Usage: OUT=dir bash scripts/gpu_round40.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "l2 or softmax_topk or test_decode_attention" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
timeout 300 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --rounds 5 --json "$OUT/ab_l2.json" \
    --variants base lngate=auto l2=w1 l2=w1+w2 l2=w1+w2+early l2=gate l2=experts l2=w1+w2+gate+experts \
    l2=w1+w2+gate+experts+early > "$OUT/ab_l2.txt" 2>&1
echo "[ab l2 rc $? at ${SECONDS}s]"; grep -E "^B=|rror|x[01]\.[0-9]" "$OUT/ab_l2.txt" | head -60
for v in 0 w1+w2+gate+experts; do
    FTMOE_L2_AHEAD=$v timeout 90 python3 scripts/critical_path.py --batches 1 --reps 10 > "$OUT/cp_$v.txt" 2>&1
    echo "[critical path $v rc $? at ${SECONDS}s]"; head -30 "$OUT/cp_$v.txt"
done
