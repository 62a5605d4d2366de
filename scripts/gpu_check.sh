#!/usr/bin/env bash
# The GPU checks in one call: kernel and fast-path tests on the GPU, then `ftmoe bench`.
# Usage (on a GPU machine, repo root): OUT=/some/dir [TUNE="--no-moe"] bash scripts/gpu_check.sh [bench args...]
# With TUNE set, `ftmoe tune $TUNE` runs between the tests and the bench (its table is copied to $OUT).
set -uo pipefail
OUT=${OUT:-/tmp/ftmoe_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TMPDIR=${TMPDIR:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import pytest" 2>/dev/null || { [ -d .gpu_wheels ] && pip install -q --no-index --find-links .gpu_wheels pytest; }
date -u +%F | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
if [ -n "${TUNE:-}" ]; then   # e.g. TUNE="--no-moe": dense GEMMs Triton vs cuBLAS, merged into the package's table
  python3 -m ftmoe.cli tune $TUNE 2>&1 | tail -40 | tee "$OUT/tune.txt"
  cp ftmoe/kernels/configs/*.json "$OUT/" 2>/dev/null
fi
python3 -m ftmoe.cli bench "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
