#!/usr/bin/env bash
# Nineteenth session's second GPU call (issue 3; ~3 min), outputs into $OUT: switch-only A/Bs in one
# process. 1. Decode attention in one pass (no split + merge kernels) at batches 1-16, where the
# split (8 programs per (row, head)) was chosen before the bounded PDL cascade and the GEMV path
# existed; its tiles; fewer splits. attn=8 launches what the base launches (the base repeated).
# 2. The early PDL trigger at 32 / 64 rows (pdl=64) against the trigger at exit.
# Ran once (nineteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round41.txt.
# Usage: OUT=dir bash scripts/gpu_round41.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 300 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --rounds 5 --json "$OUT/ab_attn.json" \
    --variants base attn=8 attn=0 attn=2 attn=4 attn=0,attnlaunch=1:128x4 attn=0,attnlaunch=1:128x8 \
    attn=0,attnlaunch=1:256x4 attn=0,preload=0 > "$OUT/ab_attn.txt" 2>&1
echo "[ab attn rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_attn.txt" | head -60
timeout 150 python3 scripts/ab_decode.py --batches 32,64 --rounds 5 --json "$OUT/ab_pdl.json" \
    --variants base lngate=auto pdl=64 > "$OUT/ab_pdl.txt" 2>&1
echo "[ab pdl rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_pdl.txt"
