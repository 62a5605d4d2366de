#!/usr/bin/env bash
# One call on a 2-GPU host, two jobs side by side, everything tarred into $OUT/round4.tgz:
#   GPU 0: kernel/fast-path tests; scripts/pdl_check.py (PDL changes no bit, real shapes);
#          `ftmoe bench --profile` with the defaults (PDL and weight prefetch on);
#   GPU 1: the same bench with FTMOE_PDL=0.
# (The run of 2026-11-28 also timed an L2 weight prefetch before the PDL wait, since removed:
# benchmarks/results/2026-11-28-h200-pdl-and-gate-ab.txt.)
# Usage: OUT=dir bash scripts/gpu_round4.sh
ROUND=round4
. scripts/gpu_env.sh
B="python3 -m ftmoe.cli bench --no-eager --no-latency --batches 1,8,64,256 --prefill 8x512 --prefill-graphs"
(export CUDA_VISIBLE_DEVICES=0
 timeout 200 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
 timeout 150 python3 scripts/pdl_check.py > "$W/pdl_check.txt" 2>&1
 timeout 150 $B --profile --json "$W/bench_pdl.json" > "$W/bench_pdl.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 FTMOE_PDL=0 timeout 150 $B --json "$W/bench_nopdl.json" > "$W/bench_nopdl.txt" 2>&1) &
wait
save end
tail -3 "$W/tests.txt"; cat "$W/pdl_check.txt" | tail -7
for f in bench_nopdl bench_pdl; do echo "== $f"; grep -E "^(decode|prefill)" "$W/$f.txt"; done
