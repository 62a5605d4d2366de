#!/usr/bin/env bash
# Serving A/B on one H200: `ftmoe serve` variants one after the other on the same random-weight
# model folder (scripts/gpu_serving_bench.sh each; graphs captured at start-up, so the first server
# compiles the kernels before it serves), rates 1, 16 and saturation. Default variants:
#   chunk1       --decode-chunk 1 (one step per engine step)
#   chunk8-wait  --decode-chunk 8 with FTMOE_CHUNK_OVERLAP=0 (each chunk's tokens waited for
#                before the next chunk is queued: the eighth session's serving A/B)
#   chunk8       --decode-chunk 8, chunks queued one ahead of the host (the default)
# Files land in $OUT/<variant>. FTMOE_SB_AB="label|ENV=V ...|serve args;..." replaces the list.
# Usage: OUT=dir bash scripts/gpu_serving_ab.sh      (carry .gpu_wheels; ~5 min)
set -u
OUT=${OUT:-/tmp/ftmoe_serve_ab}
export FTMOE_SB_MODEL_DIR=${FTMOE_SB_MODEL_DIR:-${TMPDIR:-/tmp}/ftmoe-sb-ab-model}
export FTMOE_SB_RATES=${FTMOE_SB_RATES:-1,16,inf} FTMOE_SB_NUM_REQUESTS=${FTMOE_SB_NUM_REQUESTS:-20,100,200}
export FTMOE_SB_WARMUP=${FTMOE_SB_WARMUP:-32} FTMOE_SB_BUDGET_S=${FTMOE_SB_BUDGET_S:-230}
VARIANTS=${FTMOE_SB_AB:-"chunk1|FTMOE_CHUNK_OVERLAP=1|--decode-chunk 1;chunk8-wait|FTMOE_CHUNK_OVERLAP=0|--decode-chunk 8;chunk8|FTMOE_CHUNK_OVERLAP=1|--decode-chunk 8"}
IFS=';' read -ra LIST <<< "$VARIANTS"
for v in "${LIST[@]}"; do
    IFS='|' read -r label envs args <<< "$v"
    mkdir -p "$OUT/$label"
    # shellcheck disable=SC2086
    env $envs FTMOE_SB_SERVE_ARGS="$args" OUT="$OUT/$label" bash scripts/gpu_serving_bench.sh > "$OUT/$label/log.txt" 2>&1
    echo "== $label ($envs $args)"; head -6 "$OUT/$label/summary.txt"
done
