#!/usr/bin/env bash
# Twelfth session's last GPU call (issue 3), cut to what was left of the device time (~6 min),
# outputs straight into $OUT: the in-process A/B of scripts/gpu_round22.sh (the default against
# split attention's partials merged in the Wo GEMV, attnwo=1, and the tuned path, gemv=0), then
# `ftmoe bench --prefill-graphs --no-eager --no-latency` (ratios to the floor only), then the GPU
# tests of the partials in Wo and the cascade's graph replay.
# Usage: OUT=dir bash scripts/gpu_round23.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 100 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 5 --json "$OUT/ab.json" \
    --variants base attnwo=1 gemv=0 > "$OUT/ab.txt" 2>&1; echo "[ab rc $? at ${SECONDS}s]"
grep -E "^B=" "$OUT/ab.txt" || tail -5 "$OUT/ab.txt"
timeout 170 python3 -m ftmoe.cli bench --prefill-graphs --no-eager --no-latency --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1; echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill)|rror" "$OUT/bench.txt"
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "partials or gemv_decode or (pdl_graph and feed)" > "$OUT/tests.txt" 2>&1; echo "[tests rc $? at ${SECONDS}s]"
tail -3 "$OUT/tests.txt"
