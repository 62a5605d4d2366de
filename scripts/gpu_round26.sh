#!/usr/bin/env bash
# Fifteenth session's first GPU call (issue 3), about 8 minutes, outputs straight into $OUT:
# 1. GPU tests of the greedy kernel (greedy_advance's cross-program counter), greedy chunks,
#    decode attention, and the GEMV (its new one-row FMA path, FTMOE_GEMV_FMA);
# 2. scripts/kernel_resources.py: registers / spills / shared memory of every kernel of the
#    batch-1 and batch-8 steps (default, then the FMA GEMV and routed experts): whether a GEMV's programs can
#    be resident beside the kernel before it (what its early weight loads need);
# 3. A/B at batches 1-8: base, the FMA GEMV, + the experts on the routed GEMV (gemv_experts), + the head;
# 4. scripts/host_probe.py: graph launch cost against node count and the real step's host side.
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round26.txt); the FMA GEMV and the
# routed expert GEMV measured slower there (x1.05-2.4) and were removed, with their switches.
# Usage: OUT=dir bash scripts/gpu_round26.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "greedy or decode_attention or launch_override or cuda_graph_replay or gemv or pdl_graph" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -3 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
timeout 90 python3 scripts/kernel_resources.py --batches 1,8 --env FTMOE_GEMV_FMA=1 FTMOE_GEMV_EXPERTS=1 > "$OUT/resources.txt" 2>&1
echo "[resources rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/resources.txt" | head -60
timeout 170 python3 scripts/ab_decode.py --batches 1,2,4,8 --rounds 4 --json "$OUT/ab.json" \
    --variants base gemvfma=1 gemvfma=1,gemvexperts=1 gemvfma=1,gemvexperts=1,gemvhead=1 > "$OUT/ab.txt" 2>&1
echo "[ab rc $? at ${SECONDS}s]"; grep -v -i warn "$OUT/ab.txt" | tail -20
timeout 90 python3 scripts/host_probe.py --batches 1,8 > "$OUT/host_probe.txt" 2>&1
echo "[host probe rc $? at ${SECONDS}s]"; grep -E "^(chain|decode)" "$OUT/host_probe.txt" || tail -5 "$OUT/host_probe.txt"
