#!/usr/bin/env bash
# Ran once (2026-12-08, one H100; raw benchmarks/results/2026-12-08-h100-round46.txt): its gemvepi
# switch has since been removed, so the lnpre phase fails as written.
# Twenty-first session's next GPU call (issue 3; ~6 min), outputs in $OUT/round46.tgz:
# 1. the GPU tests of the routing and fused-MoE kernels (one-kernel top-k + alignment, preload and
#    its shared-memory fallback) and of the short-context / greedy-chunk graphs;
# 2. the new defaults against the old behaviour in one process: moepreload=0 (no weight tile
#    before the wait), topkalign=0 (two kernels), both, at 16-256 rows;
#    moepreload=1 at 256 (the fallback: it must capture, and launch what the base launches);
#    moepersist=1: the aligned expert GEMMs (33+ slots) on resident programs looping over the
#    routed tiles, no program that only finds its row-block empty (at 16 / 32 rows a no-op: the
#    base repeated);
# 3. bench v24 (`ftmoe bench --prefill-graphs --no-latency`): the standing figures with these
#    defaults (the greedy-chunk rows now without the head's fp32 conversion:
#    `decode_step(fp32_logits=False)`);
# 4. (moved to scripts/gpu_round48.sh in the twenty-third session: the batch-64 A/Bs)
# 2b. (added in the twenty-third session) batches 1 and 8: lnpre=1, the LayerNorm kernels' weight
#    and bias (and the LN2 + gate kernel's gate columns) loaded before the PDL wait; gemvepi=1, the
#    GEMVs' bias (and routed prob) loaded with their weight tiles; both; against base.
# Usage: OUT=dir bash scripts/gpu_round46.sh
ROUND=round46
. scripts/gpu_env.sh
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "topk_align or preload or moe_align or gate_topk or short_context or greedy or model_dtype_logits or persistent or ln_weights or epilogue_operands" > "$W/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -25 "$W/tests.txt" | grep -v "^$"; save tests
timeout 170 python3 scripts/ab_decode.py --batches 16,32,64,128,256 --rounds 7 \
    --variants base moepreload=0 topkalign=0 moepreload=0,topkalign=0 moepreload=1 moepersist=1 > "$W/ab_defaults.txt" 2>&1
echo "[ab defaults rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab_defaults.txt"; save abdef
timeout 100 python3 scripts/ab_decode.py --batches 1,8 --rounds 7 --variants base lnpre=1 gemvepi=1 lnpre=1,gemvepi=1 \
    > "$W/ab_lnpre.txt" 2>&1
echo "[ab lnpre rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$W/ab_lnpre.txt"; save lnpre
timeout 200 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$W/bench.json" > "$W/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|eager)|rror" "$W/bench.txt"; save bench
