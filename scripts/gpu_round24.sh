#!/usr/bin/env bash
# Record of the fourteenth session's first GPU call (results: benchmarks/results/2026-12-07-h100-round24*); the
# topkw1, gatetopk and FTMOE_GREEDY_FUSED switches it times were removed after it.
# Thirteenth session's second GPU call (issue 3), about 4 minutes, outputs straight into $OUT:
# 1. where the step's time goes under PDL (scripts/critical_path.py: each kernel's advance of the
#    step's frontier) at batches 1 and 8, the plain step and the greedy-chunk step;
# 2. the in-process A/B of W1 routing its own slots from the gate logits (topkw1=1, no top-k
#    kernel) against the default (the top-k kernel);
# 3. the GPU kernel tests of the routed W1 and the top-k kernel.
# Fourteenth session: also the greedy-chunk graph with argmax + advance as torch's argmax and the
# advance kernel (FTMOE_GREEDY_FUSED=0) against the one fused kernel (the default), and its tests;
# the top-k taken by the LN2 + gate kernel's last program per row (gatetopk=1) in the same A/B;
# and decode attention at (64, 1) from 257 programs on (the H100 sweep's best at batch 64) against the rule.
# Usage: OUT=dir bash scripts/gpu_round24.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 100 python3 scripts/critical_path.py --batches 1,8 --greedy --host --detail 40 --reps 10 > "$OUT/cp.txt" 2>&1
echo "[cp rc $? at ${SECONDS}s]"; grep -A14 -E "^(====|host)" "$OUT/cp.txt"
FTMOE_GREEDY_FUSED=0 timeout 80 python3 scripts/critical_path.py --batches 1,8 --greedy --reps 10 > "$OUT/cp_unfused.txt" 2>&1
echo "[cp unfused rc $? at ${SECONDS}s]"; grep -A14 -E "^====.*greedy" "$OUT/cp_unfused.txt"
timeout 80 python3 scripts/ab_decode.py --batches 1,8 --rounds 5 --json "$OUT/ab.json" \
    --variants base topkw1=1 gatetopk=1 > "$OUT/ab.txt" 2>&1; echo "[ab rc $? at ${SECONDS}s]"
grep -E "^B=" "$OUT/ab.txt" || tail -5 "$OUT/ab.txt"
timeout 100 python3 scripts/ab_decode.py --batches 32,64,128 --rounds 3 --json "$OUT/ab_attn.json" \
    --variants base attnlaunch=257:64x1 > "$OUT/ab_attn.txt" 2>&1; echo "[ab attn rc $? at ${SECONDS}s]"
grep -E "^B=" "$OUT/ab_attn.txt" || tail -5 "$OUT/ab_attn.txt"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py -k "routes_its_slots or softmax_topk or greedy_advance or advance_decode or add_layernorm_gate or triton_gate_decode or greedy_chunk" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"
