#!/usr/bin/env bash
# Readies this checkout for `bash benchmarks/gpu_checks.sh` on a lent GPU machine (run it here,
# on the CPU host, from the repository root). Only the checkout travels there, and its image
# (jax 0.11 with CUDA, flax, optax, orbax, einops, numpy) lacks ml_collections: this puts
#   .perf/  a copy of ../shared/perf (the plain-JAX measuring stick the check runs when present)
#   .whl/   ml_collections' wheel (pure Python) at our pinned version
# into ignored folders, and prints the one `run` call that carries both.
set -eu
cd "$(dirname "$0")/.."
mkdir -p "$(git rev-parse --git-dir)/info" .perf .whl
for p in /.perf/ /.whl/; do
  grep -qxF "$p" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "$p" >> "$(git rev-parse --git-dir)/info/exclude"
done
cp ../shared/perf/*.py ../shared/perf/*.sh .perf/
ver=$(grep -i '^ml.collections==' requirements.txt | cut -d= -f3)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "ml_collections==$ver"
ls .perf .whl
echo 'run: carry [".perf", ".whl"], timeout_s 600, command: bash benchmarks/gpu_checks.sh'
