#!/usr/bin/env bash
# One call on one H200 (issue 3), tarred into $OUT/round13.tgz after each phase:
#   1. the kernel and fast-path tests on the GPU (decode inputs in one packed copy, L2 prefetch);
#   2. a decode step timed back to back, synced from the host (one copy: the engine's path) and
#      synced from device tensors (five copies: the old path), one process per mode;
#   3. L2 prefetch on a side stream (FTMOE_L2_PREFETCH=dense|all) against none, back to back
#      and synced, batches 1-16.
#      (phase 3's switch was removed after this run: it was slower; docs/NOTES.md, and the results
#      in benchmarks/results/2026-11-28-h200-sync-and-l2-prefetch-ab.txt)
# Usage: OUT=dir bash scripts/gpu_round13.sh
ROUND=round13
. scripts/gpu_env.sh
timeout 200 python3 -m pytest -q -x tests/test_kernels.py tests/test_fast_model.py > "$W/tests.txt" 2>&1
tail -3 "$W/tests.txt"; save 1
for mode in "" "--synced host" "--synced device"; do
  echo "== ab_decode $mode" >> "$W/ab-sync.txt"
  timeout 90 python3 scripts/ab_decode.py --batches 1,8,64,256 --variants base --rounds 5 $mode >> "$W/ab-sync.txt" 2>&1
done
grep -E "^(==|B=)|rror" "$W/ab-sync.txt"; save 2
for mode in "" "--synced"; do
  echo "== ab_decode $mode" >> "$W/ab-l2.txt"
  timeout 120 python3 scripts/ab_decode.py --batches 1,2,4,8,16 --variants base l2=dense l2=all --rounds 7 $mode \
    >> "$W/ab-l2.txt" 2>&1
done
echo "== ab_decode batches 32-256" >> "$W/ab-l2.txt"
timeout 100 python3 scripts/ab_decode.py --batches 32,64,256 --variants base l2=dense,l2rows=4096 --rounds 7 \
  >> "$W/ab-l2.txt" 2>&1
grep -E "^(==|B=)|rror" "$W/ab-l2.txt"; save 3
