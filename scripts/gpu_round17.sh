#!/usr/bin/env bash
# Eighth session's GPU calls on one H200 (issue 3), each under 10 minutes:
#   OUT=dir bash scripts/gpu_round17.sh bench     `ftmoe bench --prefill-graphs` (v14: the in-step-tuned
#       table; greedy-chunk rows with their own routing and floor);
#   OUT=dir bash scripts/gpu_round17.sh serving   the serving A/B of scripts/gpu_serving_ab.sh (graphs
#       captured at start-up now), into $OUT/serving/<variant> (chunk1, chunk8-wait, chunk8 since the
#       chunks are queued one ahead: the eighth session ran chunk1 and chunk8-wait, then named chunk1/chunk8).
#   OUT=dir bash scripts/gpu_round17.sh sampled   the same for sampled traffic (temperature 0.8, top-p 0.95):
#       each sampled row on its own (FTMOE_BATCH_SAMPLING=0) against rows sampled together, into
#       $OUT/sampled/<variant>.
ROUND=round17-${1:?usage: gpu_round17.sh bench|serving|sampled}
. scripts/gpu_env.sh
case "$1" in
bench)
    timeout 330 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
    grep -E "^(device|decode|prefill|latency)|rror" "$W/bench.txt"; save 1 ;;
serving)
    OUT="$W/serving" bash scripts/gpu_serving_ab.sh; save 1 ;;
sampled)
    FTMOE_SB_BENCH_ARGS="--temperature 0.8 --top-p 0.95" \
    FTMOE_SB_AB="rowwise|FTMOE_BATCH_SAMPLING=0|--decode-chunk 8;together|FTMOE_BATCH_SAMPLING=1|--decode-chunk 8" \
        OUT="$W/sampled" bash scripts/gpu_serving_ab.sh; save 1 ;;
*) echo "usage: gpu_round17.sh bench|serving|sampled" >&2; exit 2 ;;
esac
