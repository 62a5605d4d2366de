#!/usr/bin/env bash
# Eighteenth session's last GPU call (issue 3), outputs into $OUT: bench v22 (`ftmoe bench
# --prefill-graphs --no-latency`: decode attention on (16, 1) tiles past 2048 programs; the scan
# mode and the fused-MoE TMA tiles removed), then the GPU tests of what changed (the attention
# launch rule and the kernel on its tiles) in the time left (the fused-MoE kernel is again the
# version before the TMA tiles, as GPU-tested in the sixteenth session).
# Ran once (eighteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-bench-v22.*.
# Usage: OUT=dir bash scripts/gpu_round39.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp}
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 200 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill)|rror" "$OUT/bench.txt"
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout $((380 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "attention_launch or test_decode_attention" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
