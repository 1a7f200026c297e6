#!/usr/bin/env bash
# Compiles every CUDA source of the extension with nvcc for sm_90 (and the
# host files that only a CUDA build uses), without a GPU and without linking.
# A compile error fails. Used by `make test`.
#
# The headers come from a CUDA build of torch: the installed one if it is a
# CUDA build, otherwise the `torch/include` folder of the torch==2.14.1 wheel
# (downloaded once with pip, cached in build/torch-cuda-headers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
ARCH=${ETAP_CHECK_ARCH:-sm_90}

if ! command -v nvcc >/dev/null 2>&1; then
  if [ "${CI:-}" = "true" ]; then
    echo "check_cuda_compile: nvcc not found; CI requires it" >&2
    exit 1
  fi
  echo "check_cuda_compile: SKIPPED, nvcc not found"
  exit 0
fi

include_root=$("$PY" - <<'PYEOF'
import os, torch
root = os.path.join(os.path.dirname(torch.__file__), "include")
ok = torch.version.cuda is not None and os.path.isfile(
    os.path.join(root, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
print(root if ok else "")
PYEOF
)
if [ -z "$include_root" ]; then
  cache=build/torch-cuda-headers
  if [ ! -f "$cache/torch/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$cache/wheel"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$cache/wheel" "torch==2.14.1"
    "$PY" - "$cache" <<'PYEOF'
import glob, sys, zipfile
cache = sys.argv[1]
wheel = glob.glob(f"{cache}/wheel/torch-2.14.1-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    members = [n for n in archive.namelist() if n.startswith("torch/include/")]
    archive.extractall(cache, members)
PYEOF
    rm -rf "$cache/wheel"
  fi
  include_root=$cache/torch/include
fi

cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
# The CUDA headers for the host compiler: where nvcc itself looks (it may be a
# wrapper script outside the toolkit), then next to nvcc.
read -r -a nvcc_includes <<<"$(nvcc --dryrun -E -x cu /dev/null 2>&1 |
  sed -n 's/^#\$ INCLUDES="\(.*\)".*/\1/p' | head -n 1 | tr -d '"')"
includes=(-I"$include_root" -I"$include_root/torch/csrc/api/include" -Icsrc -Icuda
  "${nvcc_includes[@]}" -I"$cuda_home/include")
eigen=$("$PY" -c "import sysconfig,os;print(os.path.join(sysconfig.get_paths()['purelib'],'cmeel.prefix','include','eigen3'))")
status=0
count=0
for source in $(find cuda -name '*.cu' | sort); do
  count=$((count + 1))
  echo "check_cuda_compile: nvcc -arch=$ARCH $source"
  nvcc -c "$source" -o /dev/null -arch="$ARCH" -std=c++20 -O3 --expt-relaxed-constexpr \
    -Xcompiler -fPIC -DETAP_WITH_CUDA "${includes[@]}" || status=1
done
for source in $(find csrc -name '*_cuda.cpp' | sort); do
  count=$((count + 1))
  echo "check_cuda_compile: c++ -DETAP_WITH_CUDA $source"
  c++ -fsyntax-only -std=c++20 -DETAP_WITH_CUDA "${includes[@]}" -I"$eigen" \
    "$("$PY" -c 'import sysconfig;print("-I"+sysconfig.get_paths()["include"])')" \
    "$source" || status=1
done
if [ "$status" -ne 0 ]; then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: $count CUDA-only sources compiled for $ARCH"
