#!/usr/bin/env bash
# Fifteenth session's second GPU call (issue 3), about 8 minutes, outputs straight into $OUT:
# 1. bench v18: `ftmoe bench --prefill-graphs --no-latency` (decode batches 1/8/64/256 with their
#    greedy-chunk rows, prefill 8 x 512 from a graph, the eager baseline, copy bandwidth and
#    matmul rate measured first): the (64, 1) attention rule and the fused greedy kernel;
# 2. scripts/host_probe.py --batches 1,8 --no-chains: the step alone taken apart (input copy alone,
#    copy + replay alone);
# 3. the whole-step GPU tests round 26 did not reach (greedy chunks, graph replay, PDL graphs, GEMV).
# Usage: OUT=dir bash scripts/gpu_round27.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 280 python3 -m ftmoe.cli bench --prefill-graphs --no-latency --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|latency)|rror" "$OUT/bench.txt"
timeout 60 python3 scripts/host_probe.py --batches 1,8 --no-chains > "$OUT/host_probe.txt" 2>&1
echo "[host probe rc $? at ${SECONDS}s]"; grep -E "^(chain|decode)" "$OUT/host_probe.txt" || tail -5 "$OUT/host_probe.txt"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_fast_model.py \
    -k "greedy or cuda_graph_replay or pdl_graph or gemv" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
