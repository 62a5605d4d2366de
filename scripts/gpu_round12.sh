#!/usr/bin/env bash
# One call on one H200 (issue 3), tarred into $OUT/round12.tgz after each phase:
#   1. the kernel and fast-path tests on the GPU (8-way split decode attention, gate split-K cap);
#   2. `ftmoe bench --prefill-graphs` (the results table's run, v9).
# Usage: OUT=dir bash scripts/gpu_round12.sh
ROUND=round12
. scripts/gpu_env.sh
timeout 170 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
tail -3 "$W/tests.txt"; save 1
timeout 220 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
grep -E "^(device|decode|prefill|latency)|rror" "$W/bench.txt"; save 2
