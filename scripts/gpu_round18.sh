#!/usr/bin/env bash
# Eighth session, one call on one H200 (issue 3): the attention partials summed inside the Wo GEMV
# (FTMOE_ATTN_WO, kernels/attention.py `attn_in_wo`): the kernel and fast-path tests that cover it
# on the GPU, then in one process the steps with it against the merge kernel. Since it measured
# 13x slower it is off by default: the A/B now reads attnwo=1 against base.
# Usage: OUT=dir bash scripts/gpu_round18.sh        (~4 min; tarred into $OUT/round18.tgz)
ROUND=round18
. scripts/gpu_env.sh
timeout 90 python3 -m pytest -q -x tests/test_kernels.py -k "attention or fused_moe" > "$W/tests.txt" 2>&1
tail -1 "$W/tests.txt"
timeout 150 python3 -m pytest -q -x tests/test_fast_model.py >> "$W/tests.txt" 2>&1
tail -1 "$W/tests.txt"; save 1
timeout 150 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --variants base attnwo=1 --rounds 7 \
    > "$W/ab-attnwo.txt" 2>&1
grep -E "^B=|rror" "$W/ab-attnwo.txt"; save 2
