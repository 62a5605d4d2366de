#!/usr/bin/env bash
# Nineteenth session's third GPU call (issue 3; ~2 min), outputs into $OUT: round 41's two wins
# repeated, one process each, the base twice. 1. One-pass decode attention on (128, 8) tiles at
# batches 1-8 (round 41: x0.984 / 0.979 / 0.988 / 0.999 at 1 / 2 / 4 / 8) and its neighbours.
# 2. The early PDL trigger at 64 / 128 rows (round 41: pdl=64 x0.978 at 64, x1.004 at 32).
# Ran once (nineteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round42.txt.
# Usage: OUT=dir bash scripts/gpu_round42.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 240 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 7 --json "$OUT/ab_attn1.json" \
    --variants base attn=8 attn=0,attnlaunch=1:128x8 attn=0,attnlaunch=1:128x8,preload=1 \
    attn=0,attnlaunch=1:64x8 attn=0,attnlaunch=1:64x4 attn=0,attnlaunch=1:128x16 > "$OUT/ab_attn1.txt" 2>&1
echo "[ab attn rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_attn1.txt" | head -60
timeout 200 python3 scripts/ab_decode.py --batches 64,128 --rounds 7 --json "$OUT/ab_pdl2.json" \
    --variants base lngate=auto pdl=64 pdl=128 pdl=128,lngate=auto > "$OUT/ab_pdl2.txt" 2>&1
echo "[ab pdl rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_pdl2.txt"
