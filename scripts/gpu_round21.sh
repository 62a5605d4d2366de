#!/usr/bin/env bash
# Twelfth session's first GPU call (issue 3), under 10 minutes, outputs straight into $OUT:
#   1. the sampling probe (top-p on the 1,024-candidate topk against the full sort: `together`
#      against `together-fullsort`);
#   2. the GPU tests of the GEMV (routed experts, the bounded PDL cascade), PDL replay, sampling
#      and serving;
#   3. the in-process decode A/B at batches 1-16: the tuned path against the GEMV, the bounded
#      cascade (feed) and the GEMV head. (The call itself, 2026-12-06, also timed W2 on a routed
#      GEMV, `gemvexp`, since removed; the GEMV with the cascade is now the default up to 8 rows,
#      so the tuned path is `gemv=0` here.)
# Usage: OUT=dir bash scripts/gpu_round21.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
python3 -c "import fastapi, httpx" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels fastapi uvicorn httpx
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 240 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --rounds 7 --json "$OUT/ab.json" --variants gemv=0 \
    gemv=1,feed=0 gemv=1,feed=1 gemv=1,gemvhead=1,feed=1 \
    > "$OUT/ab.txt" 2>&1; echo "[ab rc $? at ${SECONDS}s]"
grep -E "^B=" "$OUT/ab.txt"; tail -3 "$OUT/ab.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "gemv" \
    tests/test_fast_model.py -k "gemv or pdl" > "$OUT/tests_gemv.txt" 2>&1; echo "[tests gemv rc $? at ${SECONDS}s]"
tail -3 "$OUT/tests_gemv.txt"
timeout 120 python3 scripts/sampling_probe.py --rounds 5 > "$OUT/probe.txt" 2>&1; echo "[probe rc $? at ${SECONDS}s]"
cat "$OUT/probe.txt" | tail -30
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py tests/test_engine.py tests/test_fast_model.py \
    -k "serving or sampl or chunk or candidates or to_device" > "$OUT/tests_sampling.txt" 2>&1
echo "[tests sampling rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests_sampling.txt"
