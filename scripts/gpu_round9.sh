#!/usr/bin/env bash
# One call on a 4-GPU host (issue 6), tarred into $OUT/round9.tgz after each phase:
#   1. the scaling table (scripts/gpu_scaling.sh: every layout, batch 1/64/256/1024, prefill 8x512,
#      per-rank prefill graphs on, the vectorised KV metadata);
#   2. 4-rank NCCL parity at the real shapes in bf16 with the current step protocol (TP4, EP4, TP2xEP2);
#   3. the expert-alignment GPU test past 4096 slots (multi-chunk spans), on GPU 0;
#   4. 4-rank NCCL parity on the tiny model in fp32, both paths.
# Usage: OUT=dir bash scripts/gpu_round9.sh
ROUND=round9
. scripts/gpu_env.sh
ITERS=${ITERS:-10} PER_LAYOUT_S=${PER_LAYOUT_S:-55} OUT=$W/scaling timeout 330 bash scripts/gpu_scaling.sh > /dev/null 2>&1
grep -E "^(decode|prefill|exit|skip)|rror" "$W/scaling/scaling.txt"; save 1
timeout 170 python3 scripts/gpu_parallel_check.py --real --layouts 1x4x1,4x1x1,2x2x1 --steps 32 > "$W/parity4_real.log" 2>&1
grep -E "PASS|FAIL|rror" "$W/parity4_real.log" | cut -c1-400; save 2
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m pytest -q -x tests -k "moe_align" > "$W/align.log" 2>&1
tail -3 "$W/align.log"; save 3
timeout 80 python3 scripts/gpu_parallel_check.py --tiny --layouts 4x1x1,1x4x1,2x2x1 > "$W/parity4_tiny.log" 2>&1
grep -E "PASS|FAIL|rror" "$W/parity4_tiny.log" | cut -c1-300; save 4
