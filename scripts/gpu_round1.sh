#!/usr/bin/env bash
# One call on a host with 4 GPUs, three jobs side by side, one per GPU group (timings of one job
# are not disturbed by another's GPU): GPU 0 kernel tests, `ftmoe tune --no-moe` (dense GEMMs,
# Triton vs cuBLAS; TUNE="" skips it, TUNE="" + other flags changes it) + `ftmoe bench --prefill-graphs`,
# GPU 1 the serving benchmark (scripts/gpu_serving_bench.sh), GPUs 2-3 NCCL parity for the
# 2-rank layouts (tiny fp32 both paths, then the real shapes in bf16).
# Usage: OUT=dir bash scripts/gpu_round1.sh   -> $OUT/round1.tgz and a summary on stdout.
ROUND=round1
. scripts/gpu_env.sh
nvidia-smi topo -m >> "$W/gpus.txt" 2>&1
(CUDA_VISIBLE_DEVICES=0 OUT=$W/single TUNE="${TUNE---no-moe}" timeout 560 bash scripts/gpu_check.sh --prefill-graphs > "$W/single.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=1 OUT=$W/serve timeout 560 bash scripts/gpu_serving_bench.sh > "$W/serve.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=2,3 timeout 560 python3 scripts/gpu_parallel_check.py --tiny --real \
   --layouts 2x1x1,1x2x1,1x1x2 --steps 64 > "$W/parity2.log" 2>&1) &
wait
save end
cat "$W/gpus.txt"; tail -4 "$W/single/tests.txt"; grep -E "^(decode|prefill)" "$W/single/bench.txt" | head -20
cat "$W/serve/summary.txt" 2>/dev/null | head -20; grep -E "PASS|FAIL|Error|error" "$W/parity2.log" | head -20
