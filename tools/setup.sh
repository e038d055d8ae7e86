#!/usr/bin/env bash
# Install what this project needs, skipping what is already there (safe to re-run):
#   1. Open MPI, cmake and a C++ compiler from Debian packages, if mpirun/mpicxx are missing;
#   2. a virtual environment .venv with requirements.txt (re-installed only when the file changes);
#   3. Horovod 0.28.1 built from source by tools/build_horovod.sh (wheel cached per torch version).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*"; }

if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null || ! command -v cmake >/dev/null; then
  say "installing Open MPI, cmake and build tools from Debian packages"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev cmake build-essential >/dev/null
else
  say "Open MPI $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}') present"
fi

PY=${SWA_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing requirements.txt into .venv (torch is a large wheel; about a minute from a local cache)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import torch, torchvision, mpi4py, tensorboard, yaml, tqdm, matplotlib" \
    || { echo "setup: ERROR: requirements did not install; see pip's output above" >&2; exit 1; }
  echo "$want" > "$stamp"
else
  say "requirements.txt already installed in .venv"
fi

PATH="$PWD/.venv/bin:$PATH" PYTHON=.venv/bin/python tools/build_horovod.sh
