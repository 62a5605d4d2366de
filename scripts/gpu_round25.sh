#!/usr/bin/env bash
# Fourteenth session's second GPU call (issue 3), about 7 minutes, outputs straight into $OUT:
# 1. the GPU tests of the fused greedy kernel (greedy_advance: its cross-program counter on a
#    real GPU), the greedy chunks and decode attention (the new 64-token launch config);
# 2. scripts/host_probe.py: what a graph launch costs the host and how much of it a step timed
#    alone pays (chains of 25..400 kernels, 200 kernels split over 1..8 graphs, the real step);
# 3. bench v18: `ftmoe bench --prefill-graphs --no-latency` (decode batches 1/8/64/256 with their
#    greedy-chunk rows, prefill 8 x 512 from a graph, the eager baseline, copy bandwidth and
#    matmul rate measured first).
# Usage: OUT=dir bash scripts/gpu_round25.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "greedy or decode_attention or launch_override or cuda_graph_replay" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"
timeout 100 python3 scripts/host_probe.py --batches 1,8 > "$OUT/host_probe.txt" 2>&1
echo "[host probe rc $? at ${SECONDS}s]"; grep -E "^(chain|decode)" "$OUT/host_probe.txt" || tail -5 "$OUT/host_probe.txt"
timeout 300 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|latency)|rror" "$OUT/bench.txt"
