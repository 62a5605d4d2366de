#!/usr/bin/env bash
# Nineteenth session's fifth GPU call (issue 3; ~5 min), outputs into $OUT (at most 7 files):
# 1. the GPU tests of the short-context decode graphs (one pass on (128, 8) tiles up to 128 cached
#    tokens, (256, 8) up to 256, batches 1-8), the PDL modes and the attention kernels;
# 2. those graphs against the split everywhere (attn=8) at contexts 128 and 144, one process each;
# 3. the early PDL trigger at 64 rows against the trigger at exit there (pdlalso=0), at 32 and 64,
#    and under it at 64: attention's first K/V tile before the wait (preload=1), its (64, 1) and
#    (16, 1) tiles, the gate in the LN2 kernel (lngate=1) and on cuBLAS;
# 4. bench v23 (`ftmoe bench --prefill-graphs --no-latency`).
# Ran once (nineteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round44.txt.
# Usage: OUT=dir bash scripts/gpu_round44.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fast_model.py tests/test_kernels.py \
    -k "short_context or graphs or greedy or pdl or attention" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/tests.txt" | head -20
for c in 128 144; do
    timeout 100 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 7 --ctx $c \
        --variants base lngate=auto attn=8 >> "$OUT/ab_short.txt" 2>&1
    echo "[ab ctx $c rc $? at ${SECONDS}s]"
done
grep -E "^B=|rror" "$OUT/ab_short.txt"
timeout 100 python3 scripts/ab_decode.py --batches 32,64 --rounds 7 \
    --variants base lngate=auto pdlalso=0 preload=1 attnlaunch=513:64x1 attnlaunch=513:16x1 lngate=1 \
    gate=cublas > "$OUT/ab_pdl.txt" 2>&1
echo "[ab pdl rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_pdl.txt"
timeout 200 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill)|rror" "$OUT/bench.txt"
