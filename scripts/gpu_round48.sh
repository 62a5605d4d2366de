#!/usr/bin/env bash
# Ran once (2026-12-08, one H100; raw benchmarks/results/2026-12-08-h100-round48.txt): its gemvepi
# switch has since been removed, so the lnpre phase fails as written.
# Twenty-third session's second GPU call (one GPU, ~5 min; after round 46 on the same machine),
# outputs in $OUT/round48.tgz:
# 1. scripts/aot_check.py's dry run at the real shapes (recorded on the meta device, no kernel run,
#    compiled ahead of time) beside the kernels the GPU compiled for the same steps
#    (scripts/kernel_resources.py): the same registers and shared memory per kernel, or the CPU
#    tool misleads (compare the sorted (kernel, regs, smem, warps) rows of the two);
# 2. lnpre=1 and gemvepi=1 at 16 / 64 / 256 rows (round 46 times them at 1 and 8; past 16 rows no
#    GEMV runs, so gemvepi=1 there is the base repeated: the noise).
# 3. batch 64 (from round 46): attention's first K/V tile before the wait (preload=1), alone and
#    with (64, 1) tiles (round 44: x0.991 / x0.989 alone; round 45: the tiles x0.997); the Triton
#    gate in 4 or 2 K splits rather than 8 (the one top-k + align program reads every split from L2).
# Usage: OUT=dir bash scripts/gpu_round48.sh
ROUND=round48
. scripts/gpu_env.sh
timeout 100 python3 scripts/kernel_resources.py --batches 1,8,64,256 > "$W/resources.txt" 2>&1
echo "[resources rc $? at ${SECONDS}s]"
timeout 90 python3 scripts/aot_check.py --preset gpt-moe-0.35b-64e --batches 1,8,64,256 --prefill none \
    --json "$W/aot_real.json" > "$W/aot_real.txt" 2>&1
echo "[aot rc $? at ${SECONDS}s]"; tail -1 "$W/aot_real.txt"; save aot
timeout 90 python3 scripts/ab_decode.py --batches 16,64,256 --rounds 5 --variants base lnpre=1 gemvepi=1 > "$W/ab_lnpre.txt" 2>&1
echo "[ab lnpre rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab_lnpre.txt"; save lnpre
timeout 110 python3 scripts/ab_decode.py --batches 64 --rounds 9 \
    --variants base preload=1 attnlaunch=513:64x1,preload=1 gatesplits=4 gatesplits=2 > "$W/ab64.txt" 2>&1
echo "[ab64 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab64.txt"; save ab64
