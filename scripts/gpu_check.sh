#!/usr/bin/env bash
# The GPU checks in one call: kernel and fast-path tests on the GPU, then `ftmoe bench`.
# Usage (on a GPU machine, repo root): OUT=/some/dir bash scripts/gpu_check.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/ftmoe_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TMPDIR=${TMPDIR:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import pytest" 2>/dev/null || { [ -d .gpu_wheels ] && pip install -q --no-index --find-links .gpu_wheels pytest; }
date -u +%F | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
python3 -m ftmoe.cli bench "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
