#!/usr/bin/env bash
# Sixteenth session's first GPU call (issue 3), outputs straight into $OUT (about 7 minutes):
# 1. bench v19: `ftmoe bench --prefill-graphs --no-latency` with the graph host fetch on by
#    default (decode buckets of up to 8 rows on one GPU);
# 2. A/B of steps timed alone (--synced, as the bench's decode rows) at batches 16, 32 and 64:
#    base against FTMOE_GRAPH_FETCH=1, whether the fetch pays past FETCH_MAX_ROWS = 8.
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round28.txt).
# Usage: OUT=dir bash scripts/gpu_round28.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 300 python3 -m ftmoe.cli bench --prefill-graphs --no-latency \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|latency)|rror" "$OUT/bench.txt"
timeout 150 python3 scripts/ab_decode.py --batches 16,32,64 --synced --rounds 5 --json "$OUT/ab_fetch.json" \
    --variants base fetch=1 > "$OUT/ab_fetch.txt" 2>&1
echo "[ab fetch rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab_fetch.txt" | tail -8
