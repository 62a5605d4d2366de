#!/usr/bin/env bash
# Eighteenth session's third GPU call (issue 3; under a minute), outputs into $OUT: round 35 had
# identical launches x1.008-1.009 against the first variant at batch 32, as large as the effects
# it measured; so here base and the sixteenth session's defaults (OLD) each run twice, in the
# order base, OLD, lngate=1, attnlaunch=257:64x1, base again (lngate=auto, the default), OLD again
# (lnwarps=16, the default), 11 rounds, at 64 and 128.
# Usage: OUT=dir bash scripts/gpu_round36.sh
# Ran once (eighteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round36.txt.
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 scripts/old_qkv_table.py "$OUT"
OLD="w2tiles=0,table=$OUT/old_table.json,alignwarps=4,attnlaunch=257:64x1,lngate=1"
timeout 250 python3 scripts/ab_decode.py --batches 64,128 --rounds 11 --json "$OUT/ab_twice.json" \
    --variants base "$OLD" lngate=1 attnlaunch=257:64x1 lngate=auto "$OLD,lnwarps=16" > "$OUT/ab_twice.txt" 2>&1
echo "[ab twice rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_twice.txt" | sed "s|$OUT/||"
