#!/usr/bin/env bash
# Ninth session, one call on one GPU (issue 3): the dense GEMV (`kernels/gemv.py`, FTMOE_GEMV and
# FTMOE_GEMV_HEAD) on the GPU: its kernel tests, attention over QKV partials, the fast-path tests;
# then in one process decode steps at batches 1-16: the tuned cuBLAS / Triton path (base, GEMV off
# by default) against the GEMV for the dense layers and the head, the dense layers only, both with
# every kernel triggering before its wait (cascade=1), and the attention partials summed in Wo
# (the redone sum: does that code stay?); then
# `ftmoe bench --prefill-graphs` (bench v15).
# Usage: OUT=dir bash scripts/gpu_round19.sh        (~9 min; tarred into $OUT/round19.tgz)
ROUND=round19
. scripts/gpu_env.sh
timeout 150 python3 -m pytest -q -x tests/test_kernels.py -k "gemv or attention" > "$W/tests.txt" 2>&1
tail -3 "$W/tests.txt"
timeout 150 python3 -m pytest -q tests/test_fast_model.py >> "$W/tests.txt" 2>&1
tail -3 "$W/tests.txt"; save 1
timeout 200 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --rounds 7 \
    --variants base gemv=1,gemvhead=1 gemv=1 gemv=1,gemvhead=1,cascade=1 attnwo=1 > "$W/ab-gemv.txt" 2>&1
grep -E "^B=|rror" "$W/ab-gemv.txt"; tail -3 "$W/ab-gemv.txt"; save 2
timeout 330 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
grep -E "^(device|decode|prefill|latency)|rror" "$W/bench.txt"; save 3
