#!/usr/bin/env bash
# One call on a 2-GPU host, two jobs side by side, everything tarred into $OUT/round3.tgz:
#   GPU 0: kernel/fast-path tests, then `ftmoe bench --profile` (decode 1/8/64/256, prefill 8x512
#          eager and from a graph) with the default switches, then batch 1/8/64 with FTMOE_GATE=triton
#          (on 2026-11-28 this step timed FTMOE_FUSED_GATE=1, the one-kernel gate since removed);
#   GPU 1: the whole `ftmoe tune` (MoE tiles and dense GEMMs) into a copy of the package's table,
#          then `ftmoe bench` with that table.
# Usage: OUT=dir bash scripts/gpu_round3.sh
ROUND=round3
. scripts/gpu_env.sh
B="python3 -m ftmoe.cli bench --no-eager --no-latency"
(export CUDA_VISIBLE_DEVICES=0
 OUT=$W/single TUNE="" timeout 330 bash scripts/gpu_check.sh --no-eager --no-latency --profile --prefill-graphs > "$W/single.log" 2>&1
 FTMOE_GATE=triton timeout 120 $B --batches 1,8,64 --prefill none --profile --json "$W/fused_gate.json" > "$W/fused_gate.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 cp ftmoe/kernels/configs/NVIDIA_H200.json "$W/tuned.json"
 timeout ${TUNE_S:-420} python3 -m ftmoe.cli tune --out "$W/tuned.json" > "$W/tune.txt" 2>&1
 cp "$W/tuned.json" ftmoe/kernels/configs/NVIDIA_H200.json
 timeout 120 $B --prefill 8x512 --prefill-graphs --json "$W/bench_tuned.json" > "$W/bench_tuned.txt" 2>&1) &
wait
save end
tail -3 "$W/single/tests.txt"; grep -E "^(decode|prefill)" "$W/single/bench.txt" "$W/fused_gate.txt" "$W/bench_tuned.txt"
tail -3 "$W/tune.txt"
