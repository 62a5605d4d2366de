#!/usr/bin/env bash
# One call on a 2-GPU host, tarred into $OUT/round7.tgz: the gate GEMM on cuBLAS against the
# Triton kernel (FTMOE_GATE=triton), side by side: GPU 0 the kernel/fast-path tests, then
# `ftmoe bench` with the default gate; GPU 1 the same bench with FTMOE_GATE=triton.
# Usage: OUT=dir bash scripts/gpu_round7.sh
ROUND=round7
. scripts/gpu_env.sh
B="python3 -m ftmoe.cli bench --no-eager --no-latency --batches 1,8,16,64,256 --prefill none"
(export CUDA_VISIBLE_DEVICES=0
 timeout 170 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
 timeout 90 $B --json "$W/gate_cublas.json" > "$W/gate_cublas.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 FTMOE_GATE=triton timeout 90 $B --json "$W/gate_triton.json" > "$W/gate_triton.txt" 2>&1
 FTMOE_GATE=triton timeout 120 python3 -m pytest -q -x tests/test_kernels.py -k "gate or softmax" > "$W/tests_gate.txt" 2>&1) &
wait
save end
tail -2 "$W/tests.txt"; tail -2 "$W/tests_gate.txt"; grep -E "^(device|decode)" "$W/gate_cublas.txt" "$W/gate_triton.txt"
