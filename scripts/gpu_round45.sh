#!/usr/bin/env bash
# Twentieth session's first GPU call (issue 3; ~6 min), outputs in $OUT/round45.tgz:
# 1. the GPU tests of the short-context graphs and greedy chunks (round 44's run of them stopped
#    at one failure: a chunk continued on the device into a greedy graph captured only then read
#    the ids its warm-ups had fed back; the static inputs are now put back after a capture), and
#    of the fused-MoE weight preload (bit-equal to the plain kernel);
# 2. batch 64 under the early PDL trigger: attention's (64, 1) tiles and its first K/V tile
#    before the wait, each measured once in round 44 (x0.989, x0.991), alone and together;
# 3. fused-MoE launches loading their first weight tile before the PDL wait (moepreload=1:
#    dense GEMMs and the experts' second GEMM) at 32-256 rows, where the GEMV path does not run;
# 4. batch 64's MoE top-k and slot alignment in one kernel (topkalign=1; 8 and 16 warps);
# 5. bench v24 (`ftmoe bench --prefill-graphs --no-latency`).
# Ran once (2026-12-08, one H100, MINI=1; benchmarks/results/2026-12-08-h100-round45.txt): the tests
# passed; the preload's 256-row capture ran out of shared memory (now launched again without it).
# Usage: OUT=dir bash scripts/gpu_round45.sh (MINI=1: the tests, one A/B at batch 64, then the
# preload at 32 / 128 / 256; no bench)
ROUND=round45
. scripts/gpu_env.sh
timeout $([ "${MINI:-0}" = 1 ] && echo 100 || echo 150) python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_model.py tests/test_kernels.py \
    -k "short_context or greedy_chunk or fused_moe_preload or topk_align" > "$W/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -25 "$W/tests.txt" | grep -v "^$"; save tests
if [ "${MINI:-0}" = 1 ]; then    # little device time left: the batch-64 candidates in one A/B, no bench
    timeout 150 python3 scripts/ab_decode.py --batches 64 --rounds 5 \
        --variants base topkalign=1 moepreload=1 attnlaunch=513:64x1 > "$W/ab64.txt" 2>&1
    echo "[ab64 mini rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab64.txt"; save ab64
    timeout 150 python3 scripts/ab_decode.py --batches 32,128,256 --rounds 5 \
        --variants base moepreload=1 > "$W/ab_moepre.txt" 2>&1
    echo "[ab moepreload rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab_moepre.txt"; save abpre; exit 0
fi
timeout 150 python3 scripts/ab_decode.py --batches 32,64,128,256 --rounds 5 \
    --variants base moepreload=1 > "$W/ab_moepre.txt" 2>&1
echo "[ab moepreload rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab_moepre.txt"; save abpre
timeout 160 python3 scripts/ab_decode.py --batches 64 --rounds 7 \
    --variants base attnlaunch=513:64x1 preload=1 attnlaunch=513:64x1,preload=1 \
    topkalign=1 topkalign=1,alignwarps=16 \
    > "$W/ab64.txt" 2>&1
echo "[ab64 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab64.txt"; save ab64
timeout 200 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$W/bench.json" > "$W/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|eager)|rror" "$W/bench.txt"; save bench
