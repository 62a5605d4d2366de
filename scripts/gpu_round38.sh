#!/usr/bin/env bash
# Eighteenth session's fifth GPU call (issue 3; under a minute), outputs into $OUT: round 37 had
# decode attention on (16, 1) tiles x0.991 at batch 256 (4096 programs) against (32, 1); where the
# rule should switch: (16, 1) from 1025 / 2049 / 4097 programs, at batches 128-1024, one process.
# Usage: OUT=dir bash scripts/gpu_round38.sh
# Ran once (eighteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round38.txt.
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 250 python3 scripts/ab_decode.py --batches 128,256,512,1024 --rounds 7 --json "$OUT/ab_attn16.json" \
    --variants base attnlaunch=1025:16x1 attnlaunch=4097:16x1 attnlaunch=1025:16x2 > "$OUT/ab_attn16.txt" 2>&1
echo "[ab attn16 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_attn16.txt"
