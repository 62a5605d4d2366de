#!/usr/bin/env bash
# One call on a 2-GPU host, tarred into $OUT/round6.tgz after each phase:
#   1. real-shape bf16 NCCL parity at EP=2 with the per-rank prefill graphs (now the default);
#   2. on GPU 0, decode at batch 8 and 16 with programmatic dependent launch forced on for every
#      step (FTMOE_PDL_MAX_ROWS=16) and off (FTMOE_PDL=0), to place pdl.MAX_ROWS.
# Usage: OUT=dir bash scripts/gpu_round6.sh
ROUND=round6
. scripts/gpu_env.sh
timeout 260 python3 scripts/gpu_parallel_check.py --real --layouts 1x2x1 --steps 32 > "$W/parity_ep2_real.log" 2>&1
grep -E "PASS|FAIL|rror" "$W/parity_ep2_real.log" | cut -c1-400; save 1
B="python3 -m ftmoe.cli bench --no-eager --no-latency --batches 8,16 --prefill none"
export CUDA_VISIBLE_DEVICES=0
FTMOE_PDL_MAX_ROWS=16 timeout 100 $B --json "$W/pdl16.json" > "$W/pdl16.txt" 2>&1
FTMOE_PDL=0 timeout 100 $B --json "$W/nopdl.json" > "$W/nopdl.txt" 2>&1
grep -E "^decode" "$W/pdl16.txt" "$W/nopdl.txt"; save 2
