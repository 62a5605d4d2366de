#!/usr/bin/env bash
# Seventeenth session's third GPU call (issue 3), outputs straight into $OUT (about 4 minutes;
# MINI=1: the A/Bs only, about 2 minutes, for a short device budget):
# 1. bench v21 (run last, in the time the A/Bs leave): `ftmoe bench --prefill-graphs --no-latency`
#    with the seventeenth session's defaults (the dense
#    W2 GEMV in [256, 64] TMA tiles x 8 splits; QKV at 32 / 64 rows on the Triton GEMM in 2 / 4 K
#    splits summed by attention; the one-program align on 8 warps; attention (32, 1) tiles past
#    512 programs; the gate in the LN2 kernel up to 32 rows);
# 2. A/B of those defaults against the sixteenth session's, one process, back to back (batches
#    1, 8, 64, 128), and of the fused-MoE kernel's weight tiles by TMA (FTMOE_MOE_TMA=1: the MoE
#    experts from batch 4 up, Wo and the dense MLP past 16 rows) at 1-256; at 64, the expert W1 / W2
#    in 64-column tiles (twice the programs: the wave tail of ~240 1 MB programs on 132 SMs);
#    eighteenth session: the expert GEMMs' scan mode (FTMOE_MOE_SCAN=1: no alignment kernel, each
#    GEMM on its own tuned BLOCK_M) at 1-256, and at 64 with W2 on W1's BLOCK_M (w2bm.json);
# 3. GPU tests of what changed.
# Usage: OUT=dir bash scripts/gpu_round34.sh
# Ran once (eighteenth session, 2026-12-07, one H100): benchmarks/results/2026-12-07-h100-round34.txt.
# moetma and moescan were removed after it (measured slower): those variants no longer exist.
set -u
OUT=${OUT:-/tmp/ftmoe_out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
python3 - "$OUT" <<'PY'
import json, sys, torch
h100 = "H200" not in torch.cuda.get_device_name()        # this session changed the H100 table only
t = json.load(open(f"ftmoe/kernels/configs/{'NVIDIA_H100_80GB_HBM3' if h100 else 'NVIDIA_H200'}.json"))
for m in ("32", "64") if h100 else ():
    t["dense:N=3072,K=1024,dtype=bf16"][m] = {"backend": "cublas"}     # the sixteenth session's entries
json.dump(t, open(f"{sys.argv[1]}/old_table.json", "w"), indent=1)
cur = json.load(open(f"ftmoe/kernels/configs/{'NVIDIA_H100_80GB_HBM3' if h100 else 'NVIDIA_H200'}.json"))
for name, key in (("w1n64", "E=64,N=4096,K=1024,dtype=bf16"), ("w2n64", "E=64,N=1024,K=4096,dtype=bf16")):
    v = json.loads(json.dumps(cur))       # the expert GEMM at 64 slots in 64-column tiles: twice the programs
    v[key]["64"] = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    json.dump(v, open(f"{sys.argv[1]}/{name}.json", "w"), indent=1)
v = json.loads(json.dumps(cur))           # scan mode with W2 on W1's BLOCK_M (as the aligned path runs it)
v["E=64,N=1024,K=4096,dtype=bf16"]["64"]["BLOCK_M"] = v["E=64,N=4096,K=1024,dtype=bf16"]["64"]["BLOCK_M"]
json.dump(v, open(f"{sys.argv[1]}/w2bm.json", "w"), indent=1)
PY
OLD="w2tiles=0,table=$OUT/old_table.json,alignwarps=4,attnlaunch=257:64x1,lngate=1"   # valid up to 64 rows
timeout 170 python3 scripts/ab_decode.py --batches 1,8,64 --rounds 5 --json "$OUT/ab.json" \
    --variants base "$OLD" moetma=1 moescan=1 > "$OUT/ab.txt" 2>&1
echo "[ab rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab.txt" | sed "s|$OUT/||"
timeout 100 python3 scripts/ab_decode.py --batches 64 --rounds 5 --json "$OUT/ab_tiles.json" --variants base \
    "table=$OUT/w1n64.json" "table=$OUT/w2n64.json" \
    "moescan=1,table=$OUT/w2bm.json" > "$OUT/ab_tiles.txt" 2>&1
echo "[ab tiles rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab_tiles.txt" | sed "s|$OUT/||"
timeout 90 python3 scripts/ab_decode.py --batches 128 --rounds 5 --json "$OUT/ab128.json" --variants base \
    "table=$OUT/old_table.json,alignwarps=4,attnlaunch=257:64x1" moetma=1 moescan=1 > "$OUT/ab128.txt" 2>&1
echo "[ab128 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab128.txt" | sed "s|$OUT/||"
timeout 80 python3 scripts/ab_decode.py --batches 256 --rounds 5 --json "$OUT/ab256.json" --variants base moetma=1 \
    moescan=1 > "$OUT/ab256.txt" 2>&1     # at 256 this session's defaults are the old ones
echo "[ab256 rc $? at ${SECONDS}s]"; grep -E "^B=|rror" "$OUT/ab256.txt"
left=$((560 - SECONDS))     # the bench last, in what the call has left (the A/Bs decide defaults)
[ -n "${MINI:-}" ] || timeout $((left < 240 ? left : 240)) python3 -m ftmoe.cli bench --prefill-graphs --no-latency \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "[bench rc $? at ${SECONDS}s]"; grep -E "^(device|decode|prefill)|rror" "$OUT/bench.txt"
[ -n "${MINI:-}" ] && exit 0
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
[ $SECONDS -lt 500 ] && timeout $((590 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_model.py \
    -k "fused_moe_tma or align_one_program or launch_override or scan_mode" \
    > "$OUT/tests.txt" 2>&1
echo "[tests rc $? at ${SECONDS}s]"; tail -2 "$OUT/tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
