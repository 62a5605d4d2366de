#!/usr/bin/env bash
# One call on one H200 (issue 3), tarred into $OUT/round11.tgz after each phase:
#   1. the kernel tests on the GPU (decode attention with the context split among them);
#   2. scripts/attn_sweep.py --split: splits x tile x warps at batch 1-16, contexts 128-2048;
#   3. scripts/ab_decode.py: split attention (the default) against one pass (attn=0), batch 1-64;
#   4. `ftmoe bench --prefill-graphs` (the results table's run).
# Usage: OUT=dir bash scripts/gpu_round11.sh
ROUND=round11
. scripts/gpu_env.sh
timeout 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
tail -3 "$W/tests.txt"; save 1
timeout 120 python3 scripts/attn_sweep.py --split > "$W/attn_split.txt" 2>&1
grep -E "^B=|rror" "$W/attn_split.txt"; save 2
timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8,16,32,64 --json "$W/ab.json" \
  --variants base attn=0 > "$W/ab.txt" 2>&1
grep -E "^B=|rror" "$W/ab.txt"; save 3
timeout 200 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
grep -E "^(decode|prefill|latency)|rror" "$W/bench.txt"; save 4
