#!/usr/bin/env bash
# Serving A/B on one H200: the serving engine with greedy chunks (default `--decode-chunk`, 8)
# against one step per engine step (`--decode-chunk 1`), same random-weight model folder, rates
# 1, 16 and saturation, --decode-chunk 1 first (FTMOE_SB_AB_ORDER); each run compiles its kernels
# while it captures its graphs at start-up. Files land in $OUT/chunk1 and $OUT/chunk8.
# Usage: OUT=dir bash scripts/gpu_serving_ab.sh      (carry .gpu_wheels; ~6 min)
set -u
OUT=${OUT:-/tmp/ftmoe_serve_ab}
export FTMOE_SB_MODEL_DIR=${FTMOE_SB_MODEL_DIR:-${TMPDIR:-/tmp}/ftmoe-sb-ab-model}
export FTMOE_SB_RATES=${FTMOE_SB_RATES:-1,16,inf} FTMOE_SB_NUM_REQUESTS=${FTMOE_SB_NUM_REQUESTS:-20,100,200}
export FTMOE_SB_WARMUP=${FTMOE_SB_WARMUP:-32} FTMOE_SB_BUDGET_S=${FTMOE_SB_BUDGET_S:-230}
for chunk in ${FTMOE_SB_AB_ORDER:-1 8}; do
    mkdir -p "$OUT/chunk$chunk"
    FTMOE_SB_SERVE_ARGS="--decode-chunk $chunk" OUT="$OUT/chunk$chunk" bash scripts/gpu_serving_bench.sh \
        > "$OUT/chunk$chunk/log.txt" 2>&1
    echo "== --decode-chunk $chunk"; head -8 "$OUT/chunk$chunk/summary.txt"
done
