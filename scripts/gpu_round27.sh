#!/usr/bin/env bash
# Fifteenth session's second GPU call (issue 3), outputs straight into $OUT (about 7 minutes; with
# `short`, about 4.5: no host probe, no tests, the bench cut at 200 s):
# 1. A/B of steps timed alone (--synced, as the bench's decode rows) at batches 1 and 8: base
#    against FTMOE_GRAPH_FETCH=1 (the graph's first kernel reads the inputs from pinned host memory);
# 2. bench v18: `ftmoe bench --prefill-graphs --no-latency` (decode batches 1/8/64/256 with their
#    greedy-chunk rows, prefill 8 x 512 from a graph, the eager baseline, copy bandwidth and
#    matmul rate measured first): the (64, 1) attention rule and the fused greedy kernel;
# 3. scripts/host_probe.py --batches 1,8 --no-chains: the step alone taken apart (input copy alone,
#    copy + replay alone);
# 4. the whole-step GPU tests round 26 did not reach (greedy chunks, graph replay, PDL graphs,
#    GEMV), then the host-fetch kernel's (in a process of its own).
# Usage: OUT=dir bash scripts/gpu_round27.sh [short]
set -u
OUT=${OUT:-/tmp/ftmoe_out}
SHORT=${1:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 80 python3 scripts/ab_decode.py --batches 1,8 --synced --rounds 5 --json "$OUT/ab_fetch.json" \
    --variants base fetch=1 > "$OUT/ab_fetch.txt" 2>&1
echo "[ab fetch rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab_fetch.txt" | tail -6
timeout $([ -n "$SHORT" ] && echo 200 || echo 280) python3 -m ftmoe.cli bench --prefill-graphs --no-latency \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill|latency)|rror" "$OUT/bench.txt"
[ -n "$SHORT" ] && exit 0
timeout 45 python3 scripts/host_probe.py --batches 1,8 --no-chains > "$OUT/host_probe.txt" 2>&1
echo "[host probe rc $? at ${SECONDS}s]"; grep -E "^(chain|decode)" "$OUT/host_probe.txt" || tail -5 "$OUT/host_probe.txt"
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fast_model.py \
    -k "greedy_chunk or cuda_graph_replay or pdl_graph or gemv_decode or host_metadata" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
timeout 25 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "fetch_from_host" > "$OUT/tests_fetch.txt" 2>&1
echo "[fetch tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests_fetch.txt"
