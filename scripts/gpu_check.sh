#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU and no network (torch, triton, nvcc and
# ninja already installed), build fastmeta in place, run the whole test suite
# (the cuda and triton backends run on the GPU), then the GPU benchmarks; print
# the summary table last. Logs, CSV and JSON go to $OUT (or benchmarks/results/local).
# Budget: under 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/local}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
echo "== build (log: $out/build.log)"
start=$SECONDS
FASTMETA_CUDA=1 python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { tail -n 60 "$out/build.log"; exit 1; }
echo "built in $((SECONDS - start)) s"
python -c "import fastmeta; print(fastmeta.backends())"

echo "== tests (log: $out/tests.log)"
start=$SECONDS
python -m pytest -q -x tests 2>&1 | tee "$out/tests.log" | tail -n 15
echo "tests took $((SECONDS - start)) s"

echo "== benchmarks"
python -m fastmeta.bench --device cuda --out "$out" 2>&1 | tee "$out/bench.log"
