# Sourced by the scripts/gpu_round*.sh GPU calls (set ROUND first): strict mode, $OUT, a work
# folder $W, the environment (the repo on PYTHONPATH; NCCL without NVLink multicast, which these
# hosts forbid), pytest from .gpu_wheels where the image lacks it, the GPU list in $W/gpus.txt,
# and `save PHASE`, which tars $W into $OUT/$ROUND.tgz (a call cut short keeps what it measured).
set -u
OUT=${OUT:-/tmp/ftmoe_out}
W=$(mktemp -d)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=${TMPDIR:-/tmp} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
nvidia-smi -L > "$W/gpus.txt" 2>&1
save() { tar czf "$OUT/$ROUND.tgz" -C "$W" .; echo "[phase $1 done at ${SECONDS}s]"; }
