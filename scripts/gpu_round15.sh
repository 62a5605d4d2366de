#!/usr/bin/env bash
# The next session's first call on one H200 (issue 3), tarred into $OUT/round15.tgz after each phase:
#   1. the LN fold on the GPU for the first time: its kernel test, then the model's fast-path tests
#      with it forced on (FTMOE_LN_FOLD=1);
#   2. its A/B in one process (base against lnfold=1, batches 1-16);
#   3. the kernel and fast-path tests with the defaults, then `ftmoe bench --prefill-graphs` (v12: the
#      first bench with the LN2+gate kernel and the attention preload).
# Usage: OUT=dir bash scripts/gpu_round15.sh
ROUND=round15
. scripts/gpu_env.sh
timeout 120 python3 -m pytest -q -x tests/test_kernels.py -k "ln_gemm or layernorm" > "$W/lnfold-tests.txt" 2>&1
FTMOE_LN_FOLD=1 timeout 150 python3 -m pytest -q -x tests/test_fast_model.py >> "$W/lnfold-tests.txt" 2>&1
grep -E "passed|failed|rror" "$W/lnfold-tests.txt"; save 1
timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --variants base lnfold=1 --rounds 7 > "$W/ab-lnfold.txt" 2>&1
grep -E "^B=|rror" "$W/ab-lnfold.txt"; save 2
timeout 200 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
tail -1 "$W/tests.txt"
timeout 300 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
grep -E "^(device|decode|prefill|latency)|rror" "$W/bench.txt"; save 3
