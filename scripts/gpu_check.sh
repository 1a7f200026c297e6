#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and a CUDA build of torch (2.11 or
# later), build etap-torch in place with its CUDA kernels for the visible
# GPU's architecture, run the affinity tests (their CUDA cases included) and
# the benchmarks, and print a summary table.
#
#   bash scripts/gpu_check.sh [python]      (default: $PYTHON, else python3)
#
# GPU_CHECK_BENCH_ARGS adds arguments to benchmarks/affinity_op.py (e.g.
# "--tasks 4 16 --params 64M"); GPU_CHECK_BUDGET sets the overall time limit
# in seconds (default 470).
#
# It installs nothing: the machine may be offline. What is missing (nvcc,
# pytest, Eigen) is reported, and the steps that need it are marked so.
# Eigen is looked up as setup.py does (EIGEN_INCLUDE_DIR, the cmeel-eigen
# wheel, /usr/include/eigen3). Every step has a time limit; the whole run
# stays under about eight minutes. Logs go to build/gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
LOGS=build/gpu-check
mkdir -p "$LOGS"
SUMMARY=()

say() {
  echo "gpu_check: $*"
}

record() {
  SUMMARY+=("$(printf '%-30s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
}

# run_step NAME LIMIT_SECONDS COMMAND...: runs with a time limit (cut to what
# is left of the whole run's budget), shows and logs the output, records the
# outcome. Returns the command's status.
BUDGET_SECONDS=${GPU_CHECK_BUDGET:-470}
run_step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status outcome
  local left=$((BUDGET_SECONDS - SECONDS))
  if [ "$left" -lt 10 ]; then
    record "$name" SKIPPED 0 "out of time (budget ${BUDGET_SECONDS}s)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "---- $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  status=${PIPESTATUS[0]}
  case $status in
    0) outcome=ok ;;
    124) outcome=TIMEOUT ;;
    *) outcome=FAILED ;;
  esac
  record "$name" "$outcome" "$((SECONDS - start))" "log: $LOGS/$name.log"
  return "$status"
}

print_summary() {
  echo
  echo "==================== gpu_check summary ===================="
  printf '%-30s %-8s %6s  %s\n' step outcome time notes
  for line in "${SUMMARY[@]}"; do
    echo "$line"
  done
  if [ -f "$LOGS/tests.log" ]; then
    echo "tests: $(grep -E '(passed|failed|skipped|error)' "$LOGS/tests.log" | tail -n 1)"
  fi
  echo "==========================================================="
}
trap print_summary EXIT

# ---- What this machine has -------------------------------------------------
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  say "no torch in $PY; nothing can be checked"
  record environment FAILED 0 "torch missing in $PY"
  exit 1
fi
"$PY" - <<'PYEOF' | tee "$LOGS/environment.log"
import importlib.util
import os
import sys

import torch

print(f"python      {sys.version.split()[0]} ({sys.executable})")
print(f"torch       {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"gpu         {props.name}, sm_{props.major}{props.minor}, "
          f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
else:
    print("gpu         none visible")
for module in ("numpy", "pytest", "ninja"):
    found = importlib.util.find_spec(module) is not None
    print(f"{module:<11} {'present' if found else 'MISSING'}")
eigen_candidates = [os.environ.get("EIGEN_INCLUDE_DIR", "")]
eigen_candidates += [os.path.join(p, "cmeel.prefix", "include", "eigen3") for p in sys.path if p]
eigen_candidates += ["/usr/include/eigen3", "/usr/local/include/eigen3"]
eigen = next((p for p in eigen_candidates if p and os.path.isfile(os.path.join(p, "Eigen", "Dense"))), None)
print(f"eigen       {eigen or 'MISSING (set EIGEN_INCLUDE_DIR to a folder holding Eigen/Dense)'}")
PYEOF
record environment ok 0 "log: $LOGS/environment.log"

arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else print('')")
if [ -z "$arch" ]; then
  say "no GPU is visible to torch; this script needs one"
  record gpu FAILED 0 "torch.cuda.is_available() is False"
  exit 1
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  say "nvcc was not found (put it on PATH or set CUDA_HOME); the CUDA kernels cannot be built"
  record nvcc FAILED 0 "nvcc missing"
  exit 1
fi
has_pytest=$("$PY" -c "import importlib.util; print(int(importlib.util.find_spec('pytest') is not None))")

# ---- Build -----------------------------------------------------------------
jobs=$(nproc 2>/dev/null || echo 4)
say "building in place with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs"
if ! run_step build 300 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
  "$PY" setup.py build_ext --inplace; then
  say "the build failed; see $LOGS/build.log"
  exit 1
fi
grep -E '^etap-torch:' "$LOGS/build.log" | sed 's/^/gpu_check: build decision: /'
if ! run_step import 60 "$PY" -c "
import etap_torch
assert etap_torch.built_with_cuda(), 'the extension was built without its CUDA kernels'
print('etap_torch imported; CUDA kernels present')
"; then
  exit 1
fi

# ---- Tests -----------------------------------------------------------------
status=0
tests=$(ls tests/test_affinity*.py 2>/dev/null | tr '\n' ' ')
if [ "$has_pytest" != 1 ]; then
  say "pytest is MISSING in $PY: the tests were NOT run (install pytest where a network is)"
  record tests SKIPPED 0 "pytest missing"
  status=1
elif [ -z "$tests" ]; then
  record tests SKIPPED 0 "no tests/test_affinity*.py"
else
  run_step tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider $tests || status=1
fi

# ---- Benchmarks ------------------------------------------------------------
if [ -f benchmarks/affinity_op.py ]; then
  # The largest cases come last, so a run cut by the time limit keeps the rest.
  # shellcheck disable=SC2086
  run_step bench_affinity_op 210 "$PY" benchmarks/affinity_op.py --device cuda \
    ${GPU_CHECK_BENCH_ARGS:-} || status=1
else
  record bench_affinity_op SKIPPED 0 "benchmarks/affinity_op.py not present"
fi
for bench in benchmarks/*tracker*.py benchmarks/*grouping*.py; do
  [ -f "$bench" ] || continue
  name=bench_$(basename "$bench" .py)
  if "$PY" "$bench" --help 2>/dev/null | grep -q -- '--device'; then
    run_step "$name" 60 "$PY" "$bench" --device cuda || status=1
  else
    run_step "$name" 60 "$PY" "$bench" || status=1
  fi
done
exit "$status"
