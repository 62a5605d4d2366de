#!/usr/bin/env bash
# Scaling table of issues 4 and 6 in one call: `ftmoe bench --distributed` (whole serving steps:
# broadcast, shards, logits to rank 0) for each layout, beside the one-GPU floor measured in the
# same run. Usage (GPU host, repo root): OUT=dir [LAYOUTS="1x1x1 2x1x1 ..."] bash scripts/gpu_scaling.sh
# Layout TxExP = --tp T --ep E --pp P. Writes $OUT/scaling.txt and $OUT/scaling.json (all rows).
set -uo pipefail
OUT=${OUT:-/tmp/ftmoe_out}
mkdir -p "$OUT"
W=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
n=$(nvidia-smi -L | wc -l)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; date -u; } > "$OUT/scaling.txt" 2>&1
for L in ${LAYOUTS:-1x1x1 2x1x1 4x1x1 1x2x1 1x4x1 2x2x1 1x1x2}; do
  IFS=x read -r tp ep pp <<< "$L"
  if (( tp * ep * pp > n )); then echo "skip $L: $n GPUs" >> "$OUT/scaling.txt"; continue; fi
  echo "== ftmoe bench --distributed --tp $tp --ep $ep --pp $pp --batches ${BATCHES:-1,64,256,1024} --prefill 8x512" >> "$OUT/scaling.txt"
  timeout "${PER_LAYOUT_S:-150}" python3 -m ftmoe.cli bench --distributed --tp "$tp" --ep "$ep" --pp "$pp" \
    --batches "${BATCHES:-1,64,256,1024}" --prefill 8x512 --iters "${ITERS:-20}" --json "$W/$L.json" >> "$OUT/scaling.txt" 2>&1
  echo "exit $? after ${SECONDS}s" >> "$OUT/scaling.txt"
done
python3 - "$W" "$OUT/scaling.json" <<'PY'
import glob, json, os, sys
runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))]
json.dump({"runs": runs, "rows": [dict(r, gpu=run.get("gpu"), hardware=run.get("hardware")) for run in runs for r in run["rows"]]},
          open(sys.argv[2], "w"), indent=1)
PY
grep -E "^(decode|prefill|==|exit|skip)|Error|error" "$OUT/scaling.txt" | tail -80
