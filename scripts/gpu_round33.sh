#!/usr/bin/env bash
# Seventeenth session's second GPU call (issue 3), outputs straight into $OUT (about 6 minutes):
# 1. A/B at batches 32-128, one process, of what batch 64's step spends outside its weights and KV
#    (scripts/gpu_round32.sh's critical path: QKV on cuBLAS 5.9 us a layer for ~2 us of bytes, the
#    one-program MoE alignment 5.1 us, add_layernorm_gate 7.9 us, one-pass attention 15.7 us):
#    - QKV on the Triton GEMM in 2 / 4 K splits, its fp32 partials summed by decode attention
#      (three kernel tables: the package's with the QKV entries at 32-128 replaced);
#    - the alignment with 8 / 16 warps (FTMOE_ALIGN_WARPS);
#    - one-pass attention in (16, 1), (32, 1), (32, 2) tiles from 257 programs (FTMOE_ATTN_LAUNCH);
#    - the gate through add_layernorm's fp32 copy and the fp32 GEMM (FTMOE_LN_GATE=0; cuBLAS, and
#      the Triton kernel with FTMOE_GATE=triton);
# 2. GPU tests of this session's code: the GEMV's K loop (two TMA tiles before the wait), the TMA
#    decode step (dense W2 tiles), the A/B switches, QKV partials through the Triton dense GEMM,
#    the alignment.
# Ran once (2026-12-07, H100: benchmarks/results/2026-12-07-h100-round33.txt).
# Usage: OUT=dir bash scripts/gpu_round33.sh
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 - "$OUT" <<'PY'
import json, sys
t = json.load(open("ftmoe/kernels/configs/NVIDIA_H100_80GB_HBM3.json"))
base = dict(backend="triton", GROUP_M=1, num_warps=4, num_stages=3)
for name, cfg in {"qkv_s2": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, split_k=2),
                  "qkv_s4": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, split_k=4),
                  "qkv_s4n128": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, split_k=4)}.items():
    v = json.loads(json.dumps(t))
    for m in ("32", "64", "128"):
        v["dense:N=3072,K=1024,dtype=bf16"][m] = dict(base, **cfg)
    json.dump(v, open(f"{sys.argv[1]}/{name}.json", "w"), indent=1)
PY
timeout 240 python3 scripts/ab_decode.py --batches 32,64,128 --rounds 5 --json "$OUT/ab64.json" \
    --variants base "table=$OUT/qkv_s2.json" "table=$OUT/qkv_s4.json" "table=$OUT/qkv_s4n128.json" \
    alignwarps=8 alignwarps=16 attnlaunch=257:16x1 attnlaunch=257:32x1 attnlaunch=257:32x2 \
    lngate=0 lngate=0,gate=triton > "$OUT/ab64.txt" 2>&1
echo "[ab64 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab64.txt" | sed "s|$OUT/||"
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "k_loop or tma_decode or ab_switches or split_k_match or moe_align" > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
