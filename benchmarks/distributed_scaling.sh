#!/bin/bash
# Training throughput of 1 process against 2 under torchrun (gloo, CPU), at the same global
# --tasks: 1 process with the default threads, 1 process with OMP_NUM_THREADS=1, and 2
# processes (torchrun gives each OMP_NUM_THREADS=1). Prints episodes/s of training from
# each run's summary.json (validation and test excluded).
#
#     benchmarks/distributed_scaling.sh [OMNIGLOT_DIR] [OUT_DIR]   # run on a quiet machine
set -euo pipefail
PY=${PYTHON:-python}
OMNIGLOT=${1:-}
OUT=${2:-runs/distributed-scaling}
mkdir -p "$OUT"

measure() {  # name, fastmeta train arguments...
  local name=$1; shift
  local args=("$@" --val-episodes 10 --test-episodes 10)
  $PY -m fastmeta train "${args[@]}" --out "$OUT/$name-1p" > "$OUT/$name-1p.log" 2>&1
  OMP_NUM_THREADS=1 $PY -m fastmeta train "${args[@]}" --out "$OUT/$name-1p1t" \
    > "$OUT/$name-1p1t.log" 2>&1
  $PY -m torch.distributed.run --nproc-per-node 2 --master-port "${MASTER_PORT:-29555}" \
    -m fastmeta train "${args[@]}" --out "$OUT/$name-2p" > "$OUT/$name-2p.log" 2>&1
  $PY - "$OUT" "$name" <<'EOF'
import json, sys
out, name = sys.argv[1:]
rate = {v: json.load(open(f"{out}/{name}-{v}/summary.json"))["episodes_per_second"]
        for v in ("1p", "1p1t", "2p")}
print(f"| {name} | {rate['1p']:.1f} | {rate['1p1t']:.1f} | {rate['2p']:.1f} "
      f"| {rate['2p'] / rate['1p']:.2f}x |")
EOF
}

echo "| run | 1 process | 1 process, 1 thread | 2 processes | 2 / 1 process |"
echo "| --- | --- | --- | --- | --- |"
measure protonet-synthetic protonet --tasks 32 --steps 1000 --val-every 1000
measure maml-synthetic maml --tasks 32 --steps 200 --val-every 200
if [ -n "$OMNIGLOT" ]; then
  measure maml-omniglot maml --data omniglot --data-dir "$OMNIGLOT" --tasks 16 --steps 20 \
    --val-every 20
fi
