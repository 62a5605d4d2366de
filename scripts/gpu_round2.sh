#!/usr/bin/env bash
# One call on a 4-GPU host, most important first, everything tarred into $OUT/round2.tgz after
# each phase (a call cut short keeps what it measured):
#   1. the scaling table (scripts/gpu_scaling.sh: every layout, batch 1/64/256/1024, prefill 8x512);
#   2. 4-rank NCCL parity on the tiny model in fp32 (both paths) for TP4, EP4, TP2xEP2;
#   3. side by side: GPU 0 the kernel/fast-path tests then `ftmoe bench --prefill-graphs`,
#      GPU 1 the serving benchmark (scripts/gpu_serving_bench.sh);
#   4. 4-rank parity at the real shapes in bf16.
# Usage: OUT=dir bash scripts/gpu_round2.sh
ROUND=round2
. scripts/gpu_env.sh
ITERS=${ITERS:-10} PER_LAYOUT_S=${PER_LAYOUT_S:-45} OUT=$W/scaling timeout 300 bash scripts/gpu_scaling.sh > /dev/null 2>&1
grep -E "^(decode|prefill|exit|skip)|rror" "$W/scaling/scaling.txt"; save 1
timeout 120 python3 scripts/gpu_parallel_check.py --tiny --layouts 4x1x1,1x4x1,2x2x1 > "$W/parity4_tiny.log" 2>&1
grep -E "PASS|FAIL|rror" "$W/parity4_tiny.log"; save 2
(CUDA_VISIBLE_DEVICES=0 OUT=$W/single TUNE="" timeout 240 bash scripts/gpu_check.sh --prefill-graphs > "$W/single.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=1 OUT=$W/serve timeout 240 bash scripts/gpu_serving_bench.sh > "$W/serve.log" 2>&1) &
wait
tail -3 "$W/single/tests.txt"; grep -E "^(decode|prefill)" "$W/single/bench.txt"; cat "$W/serve/summary.txt" 2>/dev/null | head -12
save 3
timeout 200 python3 scripts/gpu_parallel_check.py --real --layouts 4x1x1,1x4x1,2x2x1 > "$W/parity4_real.log" 2>&1
grep -E "PASS|FAIL|rror" "$W/parity4_real.log"; save 4
