#!/usr/bin/env bash
# The next session's first calls on one H200 (issue 3), two calls of under 10 minutes each:
#   OUT=dir bash scripts/gpu_round16.sh tests   the fast-path and engine tests and the config-lookup
#       kernel tests on the GPU (new: the serving engine's greedy chunks over CUDA graphs, the
#       in-step tuner on the tiny model, `configs.using_table`);
#   OUT=dir bash scripts/gpu_round16.sh tune    `ftmoe tune --in-step 1,2,4,8,16,32,64` on a copy of the
#       package's table (table-instep.json), then in one process the package's table against it.
# Each tars its work folder into $OUT/round16-<phase>.tgz. If the A/B shows a gain, copy
# table-instep.json over ftmoe/kernels/configs/NVIDIA_H200.json and record both outputs.
ROUND=round16-${1:?usage: gpu_round16.sh tests|tune}
. scripts/gpu_env.sh
case "$1" in
tests)
    timeout 500 python3 -m pytest -q -x tests/test_fast_model.py tests/test_engine.py \
        tests/test_kernels.py -k "not moe_align and not attention" > "$W/tests.txt" 2>&1
    tail -1 "$W/tests.txt"; save 1 ;;
tune)
    cp ftmoe/kernels/configs/NVIDIA_H200.json "$W/table-instep.json"
    timeout 400 python3 -m ftmoe.cli tune --in-step 1,2,4,8,16,32,64 --out "$W/table-instep.json" \
        > "$W/tune-instep.txt" 2>&1      # the table is written after each batch: a cut run keeps what it did
    grep -E "\->|wrote|rror" "$W/tune-instep.txt"; save 1
    timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8,16,32,64 --variants base "table=$W/table-instep.json" \
        --rounds 5 > "$W/ab-instep.txt" 2>&1
    grep -E "^B=|rror" "$W/ab-instep.txt"; save 2 ;;
*) echo "usage: gpu_round16.sh tests|tune" >&2; exit 2 ;;
esac
