#!/usr/bin/env bash
# The accelerator checks in ONE call (~9 minutes on an H200): the pre-training step before and
# after the memory-traffic changes side by side in one process (`benchmarks/gpu_step_check.py`:
# Small at 128 and 256 clips, Large-Half at 32 and 64, scatter micro-benchmarks, a 3-step
# profile with its top kernels), then the fine-tuning step at the paper's final shape and the
# DALL-E encoder if time is left. Results: OUT (default $OUT, else benchmarks/gpu_out):
# results.jsonl, summary.txt, trace/; the fine-tuning and tokenizer sections are appended to
# RESULTS (default OUT/RESULTS.append.md: only $OUT comes back from the device machine).
#
#   bash benchmarks/gpu_checks.sh [RESULTS]
#   DRY_RUN=1 bash benchmarks/gpu_checks.sh /tmp/r.md    # on CPU: tiny shapes, same code paths
#
# Before the call, here: `bash benchmarks/gpu_prepare.sh` (the wheels the device's image lacks,
# and ../shared/perf's plain-JAX step), then run with carry [".perf", ".whl"].
set -u
OUT=${OUT:-benchmarks/gpu_out}
RESULTS=${1:-$OUT/RESULTS.append.md}  # $OUT comes back from the device; copy into benchmarks/RESULTS.md
BUDGET=${BUDGET:-480}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$SECONDS
mkdir -p "$OUT"
if [ -d .whl ] && ! $PY -c "import ml_collections" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

if [ -n "${DRY_RUN:-}" ]; then
  timeout 900 $PY benchmarks/gpu_step_check.py --dry-run --out "$OUT" --budget-s "$BUDGET" || echo "FAILED ($?): gpu_step_check"
  timeout 300 $PY benchmarks/pretrain_step.py --task finetune --preset tiny --batch-size 2 --clip-len 2 \
    --frame-size 32 --steps 1 --warmup 0 --append-results "$RESULTS" --note "dry run" || echo "FAILED ($?): finetune"
  exit 0
fi
timeout $((BUDGET + 60)) $PY benchmarks/gpu_step_check.py --out "$OUT" --budget-s "$BUDGET" \
  || echo "FAILED ($?): gpu_step_check"
left=$((560 - (SECONDS - START)))
if [ "$left" -gt 70 ]; then
  timeout $((left - 10)) $PY benchmarks/pretrain_step.py --task finetune --preset small --batch-size 32 \
    --append-results "$RESULTS" --note "fine-tuning step, T=10, 256 px, released defaults" \
    || echo "FAILED ($?): finetune"
fi
left=$((560 - (SECONDS - START)))
if [ "$left" -gt 40 ]; then
  timeout $((left - 5)) $PY -m benchmarks.tokenize --dtype bfloat16 --batch-size 256 --append-results "$RESULTS" \
    || echo "FAILED ($?): tokenize"
fi
echo "total $((SECONDS - START)) s; results in $OUT/summary.txt and $RESULTS"
