#!/usr/bin/env bash
# Eighteenth session's second GPU call (issue 3; about 2 minutes), outputs into $OUT: round 34 had
# the seventeenth session's five defaults together x0.995 against the sixteenth's at batch 64
# (each alone x0.991-0.993 in rounds 32 / 33, on other cards), so each is undone alone here, at
# 32 and 64 in one process; and batch 256 again (round 34's run stopped on the scan mode's W2 tile
# that shared memory cannot hold): the defaults against FTMOE_MOE_TMA=1.
# Usage: OUT=dir bash scripts/gpu_round35.sh
# Ran once (eighteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round35.txt
# (moetma was removed after it).
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 scripts/old_qkv_table.py "$OUT"
timeout 200 python3 scripts/ab_decode.py --batches 32,64 --rounds 7 --json "$OUT/ab_undo.json" \
    --variants base "table=$OUT/old_table.json" alignwarps=4 attnlaunch=257:64x1 lngate=1 \
    "w2tiles=0,table=$OUT/old_table.json,alignwarps=4,attnlaunch=257:64x1,lngate=1" > "$OUT/ab_undo.txt" 2>&1
echo "[ab undo rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_undo.txt" | sed "s|$OUT/||"
timeout 120 python3 scripts/ab_decode.py --batches 256 --rounds 5 --json "$OUT/ab256.json" --variants base moetma=1 \
    > "$OUT/ab256.txt" 2>&1
echo "[ab256 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab256.txt"
