#!/usr/bin/env bash
# One call on a 2-GPU host, everything tarred into $OUT/round5.tgz after each phase:
#   phase 1, side by side: GPU 0 the kernel/fast-path tests, scripts/pdl_check.py, then the full
#            `ftmoe bench --prefill-graphs` (eager baseline, latency table); GPU 1 the same bench
#            with --profile and without the eager/latency parts;
#   phase 2, both GPUs: per-rank prefill graphs (FTMOE_DIST_PREFILL_GRAPHS=1): 2-rank NCCL parity
#            (tiny fp32 and real-shape bf16), then the scaling rows 1x1x1, 2x1x1, 1x2x1.
# Usage: OUT=dir bash scripts/gpu_round5.sh
ROUND=round5
. scripts/gpu_env.sh
(export CUDA_VISIBLE_DEVICES=0
 timeout 200 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
 timeout 100 python3 scripts/pdl_check.py > "$W/pdl_check.txt" 2>&1
 timeout 280 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 200 python3 -m ftmoe.cli bench --no-eager --no-latency --batches 1,8,64,256 --prefill 8x512 --prefill-graphs \
   --profile --json "$W/bench_profile.json" > "$W/bench_profile.txt" 2>&1) &
wait
tail -3 "$W/tests.txt"; tail -5 "$W/pdl_check.txt"; grep -E "^(decode|prefill|latency|  )" "$W/bench.txt" | head -40
grep -E "^(decode|prefill)" "$W/bench_profile.txt"; save 1
export FTMOE_DIST_PREFILL_GRAPHS=1
timeout 150 python3 scripts/gpu_parallel_check.py --tiny --real --layouts 2x1x1,1x2x1 --steps 32 > "$W/parity2.log" 2>&1
grep -E "PASS|FAIL|rror" "$W/parity2.log"; save 2
LAYOUTS="1x1x1 2x1x1 1x2x1" BATCHES=1,256 PER_LAYOUT_S=70 ITERS=10 OUT=$W/scaling timeout 220 bash scripts/gpu_scaling.sh > /dev/null 2>&1
grep -E "^(decode|prefill|exit|skip)|rror" "$W/scaling/scaling.txt"; save 3
