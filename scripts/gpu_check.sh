#!/usr/bin/env bash
# GPU check: the one run a short GPU loan gets (one card, no network; Python, torch,
# Triton, nvcc and ninja already installed). Prints the card, driver and versions,
# builds fastmeta._C in place for the card's arch (no pip), prints fastmeta.backends(),
# runs the GPU cases of the tests, then the GPU benchmarks and the ProtoNet sweep (ways x
# dim, with --check: every candidate's gradients against fastmeta's; the README's CPU
# sweep), and prints the summary last.
#
#   scripts/gpu_check.sh              on the GPU machine (Python: ${PYTHON:-python3})
#   scripts/gpu_check.sh --rehearse   the same steps on CPU, seconds each (CI runs it)
#
# Budget: under 9 minutes. Every step runs under `timeout` for its cap or for the time
# left before the deadline (BUDGET_S, default 525 s after the start) less the time kept
# back for later phases, whichever is smaller; a killed step gets 10 s more to exit.
#   caps (s):  machine 30, build 240, backends 60, each test file 150 (120 per test when
#              pytest-timeout is installed), benchmarks overhead 90, protonet 150,
#              inner_update 90, maml 150, metanet 120, roofline 120, protonet sweep 150, compile
#              tests 150, summary 30
#   kept back: 150 s for the benchmarks while the tests run, 45 s for the compile tests
#              (last: Inductor) while the benchmarks run, 15 s for the summary
# A step that fails, times out or gets no time is recorded and the next one runs; the
# exit status is 1 if any did, after all of them.
#
# Written to $OUT (default benchmarks/results/local) as it goes, so that a run cut off
# still returns what it measured:
#   gpu_check.log  the whole console
#   summary.md     machine, steps, test counts per test step with the failed tests,
#                  every benchmark row with its ratio to fastmeta (scripts/gpu_summary.py)
#   logs.tar.gz    every step's log, JUnit XML, benchmark CSV and JSON
#   sweep-protonet.json, sweep-protonet-{time,memory,speedup}.png   the sweep's rows and
#                  plots (python -m fastmeta.bench sweep; cut off by its limit, it keeps
#                  the points it finished and still draws them)
# The summary and the tarball are remade after every step, the sweep's files copied.
set -u
cd "$(dirname "$0")/.."
export PY=${PYTHON:-python3} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/local}
mkdir -p "$out"
rm -f "$out/summary.md" "$out/logs.tar.gz" "$out"/sweep-protonet*  # an earlier run's
export work
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT

case ${1:-} in
  --rehearse)
    export mode=rehearsal
    device=cpu
    build=("$PY" -c "import fastmeta._C")  # built by make: an in-place rebuild takes minutes
    need=(reference cpu)
    test_files=(tests/test_race.py tests/test_backend.py tests/test_gpu*.py)
    cases=(overhead protonet inner_update)
    bench=(--device cpu --quick --repeats 1)
    sweep=(--device cpu --vary ways=2,5 --vary dim=4,8 --set shots=1 --set queries=2
           --repeats 1)
    export TORCH_COMPILE_DISABLE=1 ;;  # rehearse the script, not Inductor (a minute here)
  "")
    export mode=gpu
    device=cuda
    arch=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
    build=(env FASTMETA_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)"
           "$PY" setup.py build_ext --inplace)
    need=(cpu cuda triton)
    # tests/test_gpu*.py and the kernel tests first; the CPU-only ones not at all
    first=(tests/test_gpu*.py tests/test_{protonet,inner_update,metanet_ops}.py)
    mapfile -t test_files < <(printf '%s\n' "${first[@]}" tests/test_*.py \
      | grep -Ev 'test_(bench|cli|distributed)\.py' | awk '!seen[$0]++')
    cases=(overhead protonet inner_update maml metanet)  # conv_block has no GPU kernel
    bench=(--device cuda)
    sweep=(--device cuda --vary ways=5,20,60,250,1000 --vary dim=64,512,1600) ;;
  *) echo "usage: $0 [--rehearse]" >&2; exit 2 ;;
esac
declare -A caps=([overhead]=90 [protonet]=150 [inner_update]=90 [maml]=150 [metanet]=120)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  export PYTEST_TIMEOUT=120
fi

machine() {  # the card, driver and versions
  echo "gpu_check $mode, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores"
  if [[ $mode == gpu ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || return
  fi
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
  "$PY" -c 'import platform, torch, triton
print(f"Python {platform.python_version()}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), Triton {triton.__version__}")'
}

backends() {  # backends NAME...: prints fastmeta.backends(); fails unless each NAME is usable
  "$PY" -c 'import sys, fastmeta
report = fastmeta.backends()
print(report)
missing = [f"{b} ({report.usable[b]})" for b in sys.argv[1:] if report.usable[b] is not None]
sys.exit("not usable: " + ", ".join(missing) if missing else 0)' "$@"
}

run_tests() {  # run_tests NAME PYTEST-ARGS...: JUnit XML to $work/NAME.xml; none selected passes
  "$PY" -m pytest -q -rfE --junitxml "$work/$1.xml" "${@:2}"
  local rc=$?
  return $((rc == 5 ? 0 : rc))
}
export -f machine backends run_tests

publish() {  # summary.md and logs.tar.gz, each replaced whole; the sweep's files copied
  "$PY" scripts/gpu_summary.py "$work" > "$out/summary.md.part" \
    && mv "$out/summary.md.part" "$out/summary.md"
  tar -czf "$out/logs.tar.gz.part" -C "$work" . && mv "$out/logs.tar.gz.part" "$out/logs.tar.gz"
  cp "$work"/sweep-protonet.json "$work"/sweep-protonet-*.png "$out/" 2> /dev/null || true
}

failed=()
reserve=0  # seconds kept back for later phases
step() {  # step NAME CAP CMD...: CMD (a command or a function above), logged to $work/NAME.log
  local name=$1 cap=$2 start=$SECONDS result rc
  shift 2
  local limit=$((deadline - reserve - SECONDS))
  ((limit > cap)) && limit=$cap
  if ((limit < 5)); then
    result="skipped: out of time" limit=-
  else
    echo "== $name (limit ${limit} s): $*"
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" < /dev/null 2>&1 | tee "$work/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) result=ok ;;
      124 | 137) result="TIMEOUT" ;;
      *) result="FAILED (exit $rc)" ;;
    esac
  fi
  [[ $result == ok ]] || failed+=("$name")
  printf '%s\t%s\t%s\t%s\n' "$name" "$result" $((SECONDS - start)) "$limit" >> "$work/steps.tsv"
  echo "== $name: $result after $((SECONDS - start)) s"
  publish
}

main() {
  deadline=$((SECONDS + ${BUDGET_S:-525}))
  step machine 30 machine
  step build 240 "${build[@]}"
  step backends 60 backends "${need[@]}"
  reserve=150
  for file in "${test_files[@]}"; do
    step "$(basename "$file" .py)" 150 run_tests "$(basename "$file" .py)" \
      -k "($device or gpu) and not compile" "$file"
  done
  reserve=45
  for case in "${cases[@]}"; do
    step "bench-$case" "${caps[$case]}" "$PY" -m fastmeta.bench "${bench[@]}" --case "$case" \
      --out "$work" --stem "bench-$case"
  done
  # The roofline (cap 120 s): every op's GB/s and GFLOP/s against the copy and GEMM
  # ceilings measured in the same run; roofline-DEVICE.{csv,json,png} go into logs.tar.gz.
  step roofline 120 "$PY" -m fastmeta.bench roofline "${bench[@]}" --out "$work" \
    --stem "roofline-$device"
  step sweep-protonet 150 "$PY" -m fastmeta.bench sweep --case protonet "${sweep[@]}" --check \
    --out "$work" --stem sweep-protonet
  reserve=15
  step tests-compile 150 run_tests tests-compile -k "($device or gpu) and compile" \
    "${test_files[@]}"
  reserve=0
  step summary 30 "$PY" scripts/gpu_summary.py "$work"
  if ((${#failed[@]})); then
    echo "gpu_check ($mode): ${#failed[@]} step(s) did not pass: ${failed[*]}"
    return 1
  fi
  echo "gpu_check ($mode): every step passed"
}

main 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
