#!/usr/bin/env bash
# Tenth session's GPU calls on one H100 (issue 3), each under 10 minutes:
#   OUT=dir bash scripts/gpu_round20.sh tune     scripts/stream_probe.py --quick (its output kept this time),
#       then the full `ftmoe tune` for this card into $W/table.json (MoE tiles at the default M grid,
#       dense GEMM choices at M = 1..256): the H100's own table;
#   OUT=dir bash scripts/gpu_round20.sh instep [BATCHES]   the card's committed table refined inside
#       decode steps (`ftmoe tune --in-step BATCHES`, default 1,2,4,8,16,32,64) into
#       $W/table-instep.json; run after the first table is committed as
#       ftmoe/kernels/configs/<card>.json.  The committed H100 table is the kernel-alone table
#       refined twice: `instep` then `instep 1,2,4,8,16,32,64,128,256`;
#   OUT=dir bash scripts/gpu_round20.sh bench    the GPU tests of attention, fused MoE and the fast path, an A/B in one process at
#       batches 1-64 of the card's table against the GEMV and against the H200's table, then
#       `ftmoe bench --prefill-graphs`.
ROUND=round20-${1:?usage: gpu_round20.sh tune|instep|bench}
. scripts/gpu_env.sh
case "$1" in
tune)
    timeout 60 python3 scripts/stream_probe.py --quick > "$W/stream-probe.txt" 2>&1
    tail -25 "$W/stream-probe.txt"; save 1
    timeout 480 python3 -m ftmoe.cli tune --out "$W/table.json" > "$W/tune.txt" 2>&1
    grep -cE "us" "$W/tune.txt"; grep -E "wrote|rror" "$W/tune.txt"; save 2 ;;
instep)
    key=$(python3 -c "import torch; from ftmoe.kernels.configs import device_key; print(device_key(torch.cuda.get_device_name()))")
    cp "ftmoe/kernels/configs/$key.json" "$W/table-instep.json"
    timeout 480 python3 -m ftmoe.cli tune --in-step "${2:-1,2,4,8,16,32,64}" --out "$W/table-instep.json" \
        > "$W/tune-instep.txt" 2>&1      # the table is written after each batch: a cut run keeps what it did
    grep -E "\->|wrote|rror" "$W/tune-instep.txt" | tail -30; save 1 ;;
bench)
    timeout 150 python3 -m pytest -q -x tests/test_kernels.py -k "attention or fused" tests/test_fast_model.py > "$W/tests.txt" 2>&1
    tail -3 "$W/tests.txt"; save 1
    timeout 130 python3 scripts/ab_decode.py --batches 1,2,4,8,64 --rounds 7 \
        --variants base gemv=1 table=ftmoe/kernels/configs/NVIDIA_H200.json > "$W/ab.txt" 2>&1
    grep -E "^B=|rror" "$W/ab.txt"; save 2
    timeout 330 python3 -m ftmoe.cli bench --prefill-graphs --json "$W/bench.json" > "$W/bench.txt" 2>&1
    grep -E "^(device|decode|prefill|latency)|rror" "$W/bench.txt"; save 3 ;;
*) echo "usage: gpu_round20.sh tune|instep|bench" >&2; exit 2 ;;
esac
