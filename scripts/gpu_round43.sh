#!/usr/bin/env bash
# Nineteenth session's fourth GPU call (issue 3; ~4 min), outputs into $OUT:
# 1. the GPU tests of the short-context decode graphs (one-pass attention up to 128 (row, head)
#    programs while every row has at most 128 cached tokens) and the attention kernels;
# 2. that default against the split (attn=8) at context 128, batches 1-8, one process;
# 3. where one pass stops paying as the context grows: contexts 144 (a greedy chunk past 128) and
#    256, one pass on (128, 8) / (256, 8) tiles against the split;
# 4. the early PDL trigger at 32 rows (pdl=64), the base and it twice each.
# Ran once (nineteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round43.txt.
# Usage: OUT=dir bash scripts/gpu_round43.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fast_model.py tests/test_kernels.py \
    -k "short_context or graphs or greedy or attention" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 7 --json "$OUT/ab_short.json" \
    --variants base lngate=auto attn=8 > "$OUT/ab_short.txt" 2>&1
echo "[ab short rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_short.txt"
for c in 144 256; do
    timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 5 --ctx $c --json "$OUT/ab_ctx$c.json" \
        --variants base attn=0,attnlaunch=1:128x8 attn=0,attnlaunch=1:256x8 > "$OUT/ab_ctx$c.txt" 2>&1
    echo "[ab ctx $c rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_ctx$c.txt"
done
timeout 100 python3 scripts/ab_decode.py --batches 32 --rounds 7 --json "$OUT/ab_pdl32.json" \
    --variants base lngate=auto pdl=64 pdl=64,lngate=auto > "$OUT/ab_pdl32.txt" 2>&1
echo "[ab pdl rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_pdl32.txt"
