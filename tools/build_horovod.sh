#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + MPI + Gloo) against the torch in the
# active Python, and cache the wheel so the next run takes seconds.
#
# Horovod's last release (2023) does not build against current PyTorch as shipped.
# Two small patches, both applied to the unpacked PyPI sdist:
#   1. C++ standard. Horovod hard-codes C++14; torch 2.13 needs C++17 and torch 2.14
#      needs C++20. We read the standard from torch's own <ATen/ATen.h> and set it in
#      BOTH CMakeLists.txt and horovod/torch/CMakeLists.txt (patching only the second
#      fails at link time with a duplicate gloo::rendezvous::Store symbol).
#   2. CPU-only switch. FindPytorch.cmake says "CUDA" whenever torch is a CUDA build and
#      nvcc exists, then stops at "Could NOT find CUDAToolkit (missing CUDA_CUDART)" on a
#      machine with no CUDA runtime. Unless a GPU build is asked for, we force it to CPU.
#
# Environment:
#   PYTHON                  interpreter to build for (default: python on PATH)
#   HOROVOD_GPU_OPERATIONS  set to NCCL on a GPU cluster for the NCCL build (Horovod's own
#                           variable); the CPU-only patch is then not applied.
#   SWA_WHEEL_CACHE         wheel cache dir (default: ~/.cache/swa_lib/wheels)
#   SWA_FORCE_BUILD=1       rebuild even if a cached wheel exists
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python}
# Absolute, but not symlink-resolved: a venv's python is a symlink to the base interpreter.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")";; esac
CACHE=${SWA_WHEEL_CACHE:-$HOME/.cache/swa_lib/wheels}

die() { echo "build_horovod: ERROR: $*" >&2; exit 1; }

torch_info=$("$PYTHON" - <<'PY'
import os, re, torch
hdr = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
m = re.search(r"C\+\+(\d+) or later", open(hdr).read()) if os.path.exists(hdr) else None
print(torch.__version__, m.group(1) if m else "17", int(torch.cuda.is_available()))
PY
) || die "torch is not importable from $PYTHON; install requirements.txt first"
read -r TORCH_VERSION CXX_STD CUDA_AVAILABLE <<<"$torch_info"

gpu_ops=${HOROVOD_GPU_OPERATIONS:-}
flavour=cpu; [ -n "$gpu_ops" ] && flavour=$(echo "$gpu_ops" | tr 'A-Z' 'a-z')
key="torch${TORCH_VERSION//+/_}-$flavour"
cached="$CACHE/$key/horovod-$HOROVOD_VERSION-"*.whl

check_build() {
  local out
  out=$(horovodrun --check-build 2>&1) || die "horovodrun --check-build failed:\n$out"
  for fw in PyTorch MPI Gloo; do
    echo "$out" | grep -Eq "\[X\] $fw" || die "Horovod was built without $fw:\n$out"
  done
  echo "build_horovod: horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo ($key)"
}

if "$PYTHON" -c "import horovod.torch, horovod; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null \
   && [ "${SWA_FORCE_BUILD:-0}" != 1 ]; then
  check_build; exit 0
fi

if [ "${SWA_FORCE_BUILD:-0}" != 1 ] && ls $cached >/dev/null 2>&1; then
  echo "build_horovod: installing cached wheel for $key"
  "$PYTHON" -m pip install -q --no-deps --force-reinstall $cached
  "$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging
  check_build; exit 0
fi

command -v mpicxx >/dev/null || die "mpicxx not found: install Open MPI (apt-get install openmpi-bin libopenmpi-dev)"
command -v cmake >/dev/null || die "cmake not found: install cmake and build-essential"
if [ -z "$gpu_ops" ] && [ "$CUDA_AVAILABLE" = 1 ]; then
  echo "build_horovod: note: a GPU is visible but HOROVOD_GPU_OPERATIONS is unset;" \
       "building CPU-only. Set HOROVOD_GPU_OPERATIONS=NCCL for the GPU build." >&2
fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
echo "build_horovod: building horovod $HOROVOD_VERSION for torch $TORCH_VERSION (C++$CXX_STD, $flavour); ~3 min on 2 cores"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" \
  || die "could not download the horovod $HOROVOD_VERSION sdist from PyPI"
tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
src="$work/horovod-$HOROVOD_VERSION"

# Patch 1: the C++ standard, in both files.
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
  grep -q 'set(CMAKE_CXX_STANDARD 14)' "$src/$f" || die "patch 1 no longer applies to $f"
  sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $CXX_STD)/" "$src/$f"
done
# Patch 2: CPU-only unless a GPU build was asked for.
if [ -z "$gpu_ops" ]; then
  f="$src/cmake/Modules/FindPytorch.cmake"
  anchor='string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)'
  grep -qF "$anchor" "$f" || die "patch 2 no longer applies to FindPytorch.cmake"
  sed -i "s|^string(TOUPPER \"\${Pytorch_CUDA}\" Pytorch_CUDA)|&\nset(Pytorch_CUDA FALSE)  # swa_lib: CPU-only build|" "$f"
fi

mkdir -p "$CACHE/$key"
log="$work/build.log"
if ! (cd "$src" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
      "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$CACHE/$key" . >"$log" 2>&1); then
  tail -n 40 "$log" >&2
  die "the Horovod build failed (last 40 lines above). Check the C++ standard (C++$CXX_STD) and compiler."
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall $cached
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging
check_build
