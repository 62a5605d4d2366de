#!/usr/bin/env bash
# Seventeenth session's first GPU call (issue 3), outputs straight into $OUT (about 6 minutes):
# 1. scripts/critical_path.py at batches 64 and 256 (per-kernel frontier advances), and the first
#    40 kernels of one batch-64 replay in order: where those steps go before working on them;
# 2. scripts/attn_sweep.py --split at batches 32 and 64 (context split S x BLOCK_N x warps
#    against the one pass, in a graph, as a step runs them);
# 3. A/B at batches 64-256, one process: the sorted-slot W2 in 2 / 4 K splits (FTMOE_MOE_SPLIT_K),
#    decode attention in 2 context splits (FTMOE_ATTN_SPLIT=2);
# 4. A/B at batches 1-8: add_layernorm folded into the GEMV after it (FTMOE_LN_FOLD=1: LN1 in
#    QKV, the dense LN2 in W1), add_layernorm_gate with 8 / 16 warps, the dense W2 GEMV in
#    [256, 64] tiles x 8 splits (both tiles of a split loaded before the wait; the LN after it
#    sums 8 partials, not 16).
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round32.txt). The moesplit, lnfold and
# lngatewarps switches it A/Bs were removed after it (slower or level), so phases 3-4 no longer run as written.
# Usage: OUT=dir bash scripts/gpu_round32.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 150 python3 scripts/critical_path.py --batches 64,256 --reps 10 --detail 40 > "$OUT/critical.txt" 2>&1
echo "[critical path rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/critical.txt" | grep -v "^  *[0-9]" | head -60
timeout 90 python3 scripts/attn_sweep.py --split --batches 32,64 --ctx 128 > "$OUT/attn_split.txt" 2>&1
echo "[attn split rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/attn_split.txt" | tail -4
timeout 120 python3 scripts/ab_decode.py --batches 64,128,256 --rounds 5 --json "$OUT/ab_big.json" \
    --variants base moesplit=2 moesplit=4 attn=2 > "$OUT/ab_big.txt" 2>&1
echo "[ab big rc $? at ${SECONDS}s]"; grep "^B=" "$OUT/ab_big.txt"
timeout 150 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 5 --json "$OUT/ab_small.json" \
    --variants base lnfold=1 lngatewarps=8 lngatewarps=16 w2tiles=64x256x8 lnfold=1,w2tiles=64x256x8 \
    > "$OUT/ab_small.txt" 2>&1
echo "[ab small rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_small.txt"
