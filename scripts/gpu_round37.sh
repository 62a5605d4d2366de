#!/usr/bin/env bash
# Eighteenth session's fourth GPU call (issue 3; under a minute), outputs into $OUT: decode
# attention's launch at batches 8 (128 programs: (256, 8) tiles, 8 context splits), 64 and 256
# (1024 / 4096 programs: (32, 1) tiles) against other tiles and split counts, in one process
# (`FTMOE_ATTN_LAUNCH=FROM:BLOCK_NxWARPS` applies from FROM programs on; `attn=N` splits N ways).
# Usage: OUT=dir bash scripts/gpu_round37.sh
# Ran once (eighteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round37.txt.
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 250 python3 scripts/ab_decode.py --batches 8,64,256 --rounds 7 --json "$OUT/ab_attn.json" \
    --variants base attnlaunch=513:16x1 attnlaunch=513:32x2 attnlaunch=1:128x8 attnlaunch=1:128x4 attn=4 attn=16 \
    > "$OUT/ab_attn.txt" 2>&1
echo "[ab attn rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_attn.txt"
