#!/usr/bin/env bash
# One call on one H200 (issue 3), tarred into $OUT/round14.tgz after each phase:
#   1. the kernel and fast-path tests on the GPU (greedy chunks: the advance kernel, chunk
#      against single steps, bf16 generation through chunks against the fp32 reference);
#   2. `ftmoe bench --prefill-graphs` (v10: decode rows as the serving engine steps and as greedy
#      generate runs them, 16-step chunks; the latency table through chunks).
# Usage: OUT=dir bash scripts/gpu_round14.sh
ROUND=round14
. scripts/gpu_env.sh
timeout 200 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
tail -3 "$W/tests.txt"; save 1
timeout 300 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
grep -E "^(device|decode|prefill|latency)|rror" "$W/bench.txt"; save 2
