#!/usr/bin/env bash
# Twelfth session's second GPU call (issue 3), under 10 minutes, outputs straight into $OUT:
# 1. the in-process decode A/B at batches 1-8: the default (GEMV + bounded PDL cascade) against
#    split attention's partials merged in the Wo GEMV (attnwo=1) and the tuned cuBLAS / Triton
#    path (gemv=0);
# 2. the GPU tests of the GEMV, the partials in Wo and PDL replay;
# 3. `ftmoe bench --prefill-graphs --no-latency` (v17); 4. the decode-attention launch sweep
#    (batch 64's kernel), if time is left.
# (A record of the call: the attnwo switch it times has been removed since, slower at every batch.)
# Usage: OUT=dir bash scripts/gpu_round22.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 110 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 7 --json "$OUT/ab.json" \
    --variants base attnwo=1 gemv=0 > "$OUT/ab.txt" 2>&1; echo "[ab rc $? at ${SECONDS}s]"
grep -E "^B=" "$OUT/ab.txt" || tail -5 "$OUT/ab.txt"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "partials or gemv_decode or (pdl_graph and feed)" > "$OUT/tests.txt" 2>&1; echo "[tests rc $? at ${SECONDS}s]"
tail -3 "$OUT/tests.txt"
timeout 280 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|latency)|rror" "$OUT/bench.txt"
timeout 50 python3 scripts/attn_sweep.py > "$OUT/attn_sweep.txt" 2>&1; echo "[sweep rc $? at ${SECONDS}s]"
cat "$OUT/attn_sweep.txt"
