#!/usr/bin/env bash
# The accelerator checks of issues 3 and 4 in one go: the pre-training step (Small, Large-Half)
# and the DALL-E encoder's frames/s. Each benchmark appends its section to RESULTS (default
# benchmarks/RESULTS.md); each run has its own time limit so that one slow compile cannot eat
# the others' time.
#
#   bash benchmarks/gpu_checks.sh [RESULTS] [PEAK_TFLOPS]     # 989: H100 SXM dense bf16
set -u
RESULTS=${1:-benchmarks/RESULTS.md}
PEAK=${2:-989}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

step() { timeout "$1" $PY -m benchmarks.pretrain_step --peak-tflops "$PEAK" --append-results "$RESULTS" "${@:2}" || echo "FAILED ($?): pretrain_step ${*:2}"; }
# The released defaults (attention dropout 0.1 takes the einsum path), then without attention
# dropout (the fused dot_product_attention), then Large-Half at the reference's 32 clips (its
# compile alone took 153 s on an H200).
step 150 --preset small --batch-size 64 --note "released defaults (attention dropout 0.1)"
step 120 --preset small --batch-size 64 --attention-dropout 0 --note "attention dropout 0: fused attention"
step 330 --preset large_half --batch-size 16 --attention-dropout 0 --note "32 clips as the reference"

timeout 150 $PY -m benchmarks.tokenize --dtype bfloat16 --batch-size 256 --append-results "$RESULTS" \
  || echo "FAILED ($?): tokenize"
