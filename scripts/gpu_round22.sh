#!/usr/bin/env bash
# Twelfth session's second GPU call (issue 3), under 10 minutes, outputs straight into $OUT:
# the GPU tests of the GEMV and the bounded PDL cascade (now the default up to 8 rows), then
# `ftmoe bench --prefill-graphs` (v17), then the decode-attention launch sweep (batch 64's kernel).
# Usage: OUT=dir bash scripts/gpu_round22.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "gemv" \
    tests/test_fast_model.py -k "gemv or pdl_graph" > "$OUT/tests_gemv.txt" 2>&1; echo "[tests rc $? at ${SECONDS}s]"
tail -3 "$OUT/tests_gemv.txt"
timeout 330 python3 -m ftmoe.cli bench --prefill-graphs --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|latency)|rror" "$OUT/bench.txt"
timeout 60 python3 scripts/attn_sweep.py > "$OUT/attn_sweep.txt" 2>&1; echo "[sweep rc $? at ${SECONDS}s]"
cat "$OUT/attn_sweep.txt"
