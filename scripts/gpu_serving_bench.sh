#!/usr/bin/env bash
# Serving benchmark on one GPU: random weights at the real shapes of gpt-moe-0.35b-64e (24 layers,
# 64 experts, hidden 1024; ~13 GB fp16 files) written straight as a FasterTransformer 1-gpu folder,
# `ftmoe serve` on it (fast path: FastGPTMoE + CUDA graphs, bf16), then `ftmoe bench serving` at
# 1, 4, 16, 64 requests/s and saturation with random 128-1024-token token-id prompts and 128 output
# tokens each (ignore_eos): TTFT, TPOT, ITL (p50/p99), E2E latency, request and token throughput.
#
# Usage (repo root; the `.gpu_wheels/` folder must travel with the repo if the machine may lack
# fastapi/uvicorn/httpx/tokenizers/numpy):
#   OUT=/some/dir bash scripts/gpu_serving_bench.sh                       # GPU, ~5-8 min
#   FTMOE_SERVE_BENCH_SMOKE=1 OUT=dir bash scripts/gpu_serving_bench.sh   # CPU smoke test: tiny preset, < 1 min
# Knobs (environment): CUDA_VISIBLE_DEVICES (default 0), FTMOE_SB_RATES, FTMOE_SB_NUM_REQUESTS (one
# count or one per rate), FTMOE_SB_PROMPT_LEN (LO:HI), FTMOE_SB_MAX_TOKENS, FTMOE_SB_WARMUP,
# FTMOE_SB_DTYPE (served dtype), FTMOE_SB_BUDGET_S (whole-run budget; each rate's cap comes from
# what is left), FTMOE_SB_MODEL_DIR (built there, or reused when it already holds a valid model),
# FTMOE_SB_SERVE_ARGS (extra `ftmoe serve` options), FTMOE_SB_BENCH_ARGS (extra `ftmoe bench serving`
# options, e.g. "--temperature 0.8 --top-p 0.95" for sampled traffic), PYTHON (default python3).
# Files written to $OUT (6): env.txt, build.txt, bench.txt (per-rate tables), bench.json (list of
# per-rate results), summary.txt (one row per rate + step status), server_log.txt (log tail + /metrics).
set -uo pipefail
T_START=$(date +%s)
SMOKE=${FTMOE_SERVE_BENCH_SMOKE:-0}
OUT=${OUT:-/tmp/ftmoe_serve_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TMPDIR=${TMPDIR:-/tmp} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "$SMOKE" = 1 ]; then
    PRESET=tiny DEVICE=cpu FILE_DTYPE=fp32
    DTYPE=${FTMOE_SB_DTYPE:-float32}
    RATES=${FTMOE_SB_RATES:-4,inf} NREQ=${FTMOE_SB_NUM_REQUESTS:-6,8}
    PROMPT_LEN=${FTMOE_SB_PROMPT_LEN:-4:32} MAX_TOKENS=${FTMOE_SB_MAX_TOKENS:-8} WARMUP=${FTMOE_SB_WARMUP:-2}
    BUDGET=${FTMOE_SB_BUDGET_S:-50} BUILD_LIMIT=60 LOAD_LIMIT=60 RATE_CAP=20
else
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    PRESET=gpt-moe-0.35b-64e DEVICE=cuda FILE_DTYPE=fp16
    DTYPE=${FTMOE_SB_DTYPE:-bfloat16}       # the tuned fused-MoE configs are bf16 (kernels/configs)
    RATES=${FTMOE_SB_RATES:-1,4,16,64,inf} NREQ=${FTMOE_SB_NUM_REQUESTS:-30,60,120,200,200}
    PROMPT_LEN=${FTMOE_SB_PROMPT_LEN:-128:1024} MAX_TOKENS=${FTMOE_SB_MAX_TOKENS:-128} WARMUP=${FTMOE_SB_WARMUP:-128}
    BUDGET=${FTMOE_SB_BUDGET_S:-470} BUILD_LIMIT=240 LOAD_LIMIT=240 RATE_CAP=80
fi
MODEL_DIR=${FTMOE_SB_MODEL_DIR:-$TMPDIR/ftmoe-sb-model-$PRESET-$FILE_DTYPE}
WORK=$(mktemp -d "$TMPDIR/ftmoe-serve-bench.XXXXXX")
SERVER_LOG=$WORK/server.log
STATUS=()                                      # one line per step, printed into summary.txt
step() { STATUS+=("$(printf '%-8s %-4s %5ss  %s' "$1" "$2" "$(( $(date +%s) - T_START ))" "${3:-}")"); echo "== $1: $2 ${3:-}"; }
elapsed() { echo $(( $(date +%s) - T_START )); }

SERVER_PID=
finish() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null; step stop FAIL "server ignored SIGTERM for 20 s: killed"
        else wait "$SERVER_PID" 2>/dev/null; step stop ok "server exit status $?"; fi
    fi
    if [ -f "$SERVER_LOG" ]; then
        { echo "---- server log: last 150 of $(wc -l < "$SERVER_LOG") lines ----"; tail -n 150 "$SERVER_LOG"
          [ -f "$WORK/metrics.txt" ] && { echo "---- /metrics after the benchmark (ftmoe_* lines) ----"; grep '^ftmoe_' "$WORK/metrics.txt"; }
        } > "$OUT/server_log.txt"
    fi
    { [ -f "$WORK/summary_table.txt" ] && cat "$WORK/summary_table.txt"
      echo; echo "steps (name, status, seconds since start, note):"; printf '  %s\n' "${STATUS[@]}"
    } > "$OUT/summary.txt"
    cat "$OUT/summary.txt"
    rm -rf "$WORK"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---- 0. environment and runtime dependencies ------------------------------------------------
{
    date -u '+%F %T UTC'
    echo "mode: $([ "$SMOKE" = 1 ] && echo "CPU smoke" || echo GPU) preset=$PRESET device=$DEVICE served dtype=$DTYPE files=$FILE_DTYPE"
    echo "rates=$RATES num_requests=$NREQ prompt_len=$PROMPT_LEN max_tokens=$MAX_TOKENS warmup=$WARMUP budget=${BUDGET}s"
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} git=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

# prints the modules that do not import (empty when all do)
NEEDED="torch numpy tokenizers fastapi starlette pydantic uvicorn httpx$([ "$SMOKE" = 1 ] || echo " triton")"
check_imports() {
    "$PY" -c "
import importlib, sys
bad = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f'{m} ({type(e).__name__}: {e})'[:120])
print('; '.join(bad))" $NEEDED 2>&1 | tail -1
}
missing=$(check_imports)
if [ -n "$missing" ]; then
    echo "missing runtime packages ($missing); installing from .gpu_wheels" | tee -a "$OUT/env.txt"
    if [ -d .gpu_wheels ]; then
        for spec in "numpy --no-deps" "tokenizers --no-deps" "fastapi uvicorn httpx"; do
            mod=${spec%% *}
            "$PY" -c "import $mod" 2>/dev/null && continue
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --find-links .gpu_wheels $spec 2>&1 | tail -3 | tee -a "$OUT/env.txt" ||
                "$PY" -m pip install -q --user --no-index --find-links .gpu_wheels $spec 2>&1 | tail -3 | tee -a "$OUT/env.txt"
        done
    else
        echo "no .gpu_wheels folder here (it is git-ignored: carry it with the repo)" | tee -a "$OUT/env.txt"
    fi
    missing=$(check_imports)
fi
if [ -n "$missing" ]; then
    echo "MISSING: ftmoe serve / bench serving need $NEEDED; these do not import: $missing." \
         "Fill .gpu_wheels for this Python ($("$PY" -V 2>&1)): see docs/NOTES.md, Serving." | tee -a "$OUT/env.txt"
    step deps FAIL "$missing"
    exit 1
fi
"$PY" -c "import fastapi, uvicorn, httpx, pydantic, tokenizers, numpy; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'httpx', httpx.__version__, 'pydantic', pydantic.VERSION, 'tokenizers', tokenizers.__version__, 'numpy', numpy.__version__)" 2>&1 | tee -a "$OUT/env.txt"
step deps ok

# ---- 1. the model folder (random weights, FT 1-gpu layout) ----------------------------------
if [ -f "$MODEL_DIR/1-gpu/config.ini" ] && "$PY" -m ftmoe.cli info "$MODEL_DIR/1-gpu" > "$WORK/info.txt" 2>&1; then
    { echo "reusing $MODEL_DIR/1-gpu"; grep -E '^(parameters|files)' "$WORK/info.txt"; } | tee "$OUT/build.txt"
    step build ok "reused"
else
    rm -rf "$MODEL_DIR"
    timeout "$BUILD_LIMIT" "$PY" -m ftmoe.synthetic "$MODEL_DIR" --preset "$PRESET" --dtype "$FILE_DTYPE" \
        --device "$DEVICE" 2>&1 | tee "$OUT/build.txt"
    rc=${PIPESTATUS[0]}
    "$PY" -m ftmoe.cli info "$MODEL_DIR/1-gpu" 2>&1 | grep -E '^(parameters|files|ftmoe: error)' | tee -a "$OUT/build.txt"
    if [ "$rc" != 0 ]; then step build FAIL "exit $rc (124: over ${BUILD_LIMIT}s)"; exit 1; fi
    step build ok "$(df -h "$MODEL_DIR" | awk 'NR==2 {print $4 " free on " $6}')"
fi

# ---- 2. the server --------------------------------------------------------------------------
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL=http://127.0.0.1:$PORT
# shellcheck disable=SC2086
"$PY" -m ftmoe.cli serve --model "$MODEL_DIR/1-gpu" --served-model-name "$PRESET" --host 127.0.0.1 --port "$PORT" \
    --device "$DEVICE" --dtype "$DTYPE" --log-level warning --shutdown-timeout 10 ${FTMOE_SB_SERVE_ARGS:-} \
    > "$SERVER_LOG" 2>&1 &
SERVER_PID=$!
up=0
for _ in $(seq 1 $(( LOAD_LIMIT * 2 ))); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$URL" 2>/dev/null; then
        up=1; break
    fi
    sleep 0.5
done
grep -m1 "ftmoe: serving" "$SERVER_LOG"
if [ "$up" != 1 ]; then
    echo "server did not answer /health (alive: $(kill -0 "$SERVER_PID" 2>/dev/null && echo yes || echo no)); log tail:"
    tail -n 30 "$SERVER_LOG"
    step serve FAIL "no /health within ${LOAD_LIMIT}s"
    exit 1
fi
step serve ok "$(grep -m1 -o '\[.*\]' "$SERVER_LOG" | head -1)"

# ---- 3. the benchmark: warmup, then each rate ---------------------------------------------------
n_rates=$(echo "$RATES" | tr ',' '\n' | wc -l)
left=$(( BUDGET - $(elapsed) - 15 ))
cap=$(( left / (n_rates + 1) ))
[ "$cap" -gt "$RATE_CAP" ] && cap=$RATE_CAP
[ "$cap" -lt 10 ] && cap=10
echo "== bench: $n_rates rates, each (and the warmup) capped at ${cap}s; $(elapsed)s spent so far"
timeout $(( cap * (n_rates + 1) + 30 )) "$PY" -m ftmoe.cli bench serving --base-url "$URL" --model "$PRESET" \
    --request-rate "$RATES" --num-requests "$NREQ" --prompt-len "$PROMPT_LEN" --max-tokens "$MAX_TOKENS" \
    --warmup "$WARMUP" --max-duration "$cap" --timeout "$cap" --seed 0 --json "$OUT/bench.json" ${FTMOE_SB_BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.txt"
rc=${PIPESTATUS[0]}
"$PY" -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + '/metrics', timeout=5).read().decode())" \
    "$URL" > "$WORK/metrics.txt" 2>&1
if [ -f "$OUT/bench.json" ]; then
    "$PY" - "$OUT/bench.json" "$WORK/summary_table.txt" <<'EOF'
import json, sys
from ftmoe.entrypoints.bench_serving import format_summary
runs = json.load(open(sys.argv[1]))
runs = runs if isinstance(runs, list) else [runs]
with open(sys.argv[2], "w") as f:
    f.write(format_summary(runs) + "\n")
    for r in runs:
        for e in r.get("errors") or []:
            f.write(f"rate {r['request_rate']}: error: {e}\n")
EOF
fi
kill -0 "$SERVER_PID" 2>/dev/null || echo "the server died during the benchmark: see server_log.txt"
if [ "$rc" = 0 ]; then step bench ok; else step bench FAIL "exit $rc (124: cut off; 1: a rate completed nothing)"; fi
exit "$rc"
