#!/usr/bin/env bash
# One call on one H200 (issue 3), tarred into $OUT/round10.tgz after each phase:
#   1. `ftmoe tune --no-moe --dense-m 128,256` into a copy of the package's table;
#   2. scripts/ab_decode.py, in one process, interleaved: the defaults, PDL for every step,
#      the gate GEMM on Triton and on cuBLAS, and the copy of the table, batch 1..256.
# Usage: OUT=dir bash scripts/gpu_round10.sh
ROUND=round10
. scripts/gpu_env.sh
cp ftmoe/kernels/configs/NVIDIA_H200.json "$W/tuned.json"
timeout 230 python3 -m ftmoe.cli tune --no-moe --dense-m 128,256 --out "$W/tuned.json" > "$W/tune.txt" 2>&1
grep -E "dense" "$W/tune.txt" | tail -8; save 1
timeout 300 python3 scripts/ab_decode.py --batches 1,8,32,64,128,256 --json "$W/ab.json" \
  --variants base pdl=4096 gate=triton gate=cublas "table=$W/tuned.json" > "$W/ab.txt" 2>&1
grep -E "^B=|rror" "$W/ab.txt"; save 2
