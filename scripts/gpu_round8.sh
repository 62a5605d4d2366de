#!/usr/bin/env bash
# Prepared for the next GPU session (one H200; not yet run), tarred into $OUT/round8.tgz:
#   1. the gate GEMM on cuBLAS against the Triton kernel at 64-256 rows, back to back on one GPU
#      (FTMOE_GATE=auto takes Triton for 17-32 rows only so far);
#   2. `ftmoe tune --no-moe --dense-m 128,256` into a copy of the package's table (Triton split-K
#      partials for Wo and the MLP's W2 are summed by the next LayerNorm), then decode at batch
#      64/128/256 with the package's table and with the copy, back to back. Commit the copy as
#      ftmoe/kernels/configs/NVIDIA_H200.json only where the second bench is faster.
# Usage: OUT=dir bash scripts/gpu_round8.sh
ROUND=round8
. scripts/gpu_env.sh
B="python3 -m ftmoe.cli bench --no-eager --no-latency --prefill none --iters 100"
for r in 1 2; do for g in cublas triton; do
  echo "== run $r FTMOE_GATE=$g" >> "$W/gate.txt"
  FTMOE_GATE=$g timeout 80 $B --batches 64,128,256 2>&1 | grep -E "^decode" >> "$W/gate.txt"
done; done
cat "$W/gate.txt"; save 1
cp ftmoe/kernels/configs/NVIDIA_H200.json "$W/tuned.json"
timeout 300 python3 -m ftmoe.cli tune --no-moe --dense-m 128,256 --out "$W/tuned.json" > "$W/tune.txt" 2>&1
tail -8 "$W/tune.txt"; save 2
cp ftmoe/kernels/configs/NVIDIA_H200.json "$W/before.json"
for t in before tuned; do
  cp "$W/$t.json" ftmoe/kernels/configs/NVIDIA_H200.json
  echo "== table $t" >> "$W/dense.txt"
  timeout 80 $B --batches 64,128,256 2>&1 | grep -E "^decode" >> "$W/dense.txt"
done
cp "$W/before.json" ftmoe/kernels/configs/NVIDIA_H200.json
cat "$W/dense.txt"; save 3
