#!/usr/bin/env bash
# The GPU check (issue #21): one command, under 8 minutes on one GPU.
#   scripts/gpu_check.sh            on a CUDA machine: the CUDA-marked tests, bench engine on SmolLM2 (eager vs
#                                   CUDA graphs vs the bare loop), and the training benchmark
#   scripts/gpu_check.sh --cpu      the same steps on the CPU with the tiny model and small sizes (a dry run that
#                                   checks the script itself; the CUDA tests skip)
# Writes everything under ${OUT:-runs/gpu-check} (logs and JSON). Exit status: the first failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu-check}
DATA=${DATA:-../shared/data/emotion}
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep the first failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    local rc=$?
    echo "   FAILED (status $rc) after $((SECONDS - start)) s; tail of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/   | /'
    [[ $status -eq 0 ]] && status=$rc
  fi
  grep -E "^(decode|compiled|bf16|int8|prefill|prefix|bench engine|tiny|prefixtune|  )" "$OUT/$name.log" 2>/dev/null \
    | sed 's/^/   /' || true
}

if [[ $MODE == gpu ]]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with --cpu')"
  $PY -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  MODEL=smollm2-135m; BATCHES=1,16,32; TOKENS=64; ROWS=256; STEPS=10; EXTRA=()
else  # compiling with inductor on a small shared CPU takes minutes: the dry run skips it
  MODEL=tiny; BATCHES=1,4; TOKENS=8; ROWS=16; STEPS=2; EXTRA=(--no-compile --no-served)
fi
$PY -m prefixtune doctor >"$OUT/doctor.log" 2>&1 || true

step cuda-tests 180 $PY -m pytest -q -p no:xdist -m cuda tests/engine/test_cuda.py
step bench-engine 300 $PY -m prefixtune bench engine --model "$MODEL" --batches "$BATCHES" --new-tokens "$TOKENS" \
  --repeats 2 "${EXTRA[@]}" --out "$OUT/engine"
if [[ -f "$DATA/train.jsonl" ]]; then
  TRAIN_MODEL=$MODEL
  [[ $MODE == cpu ]] && TRAIN_MODEL=$($PY -c "from prefixtune.testing import save_tiny_model; print(save_tiny_model('$OUT/tiny'))")
  step bench-train 240 $PY -m prefixtune bench --model "$TRAIN_MODEL" --data "$DATA" --sections train \
    --steps "$STEPS" --rows "$ROWS" --out "$OUT/train"
else
  echo "== bench-train skipped: no emotion data at $DATA (set DATA=...)"
fi
echo "results under $OUT"
exit $status
