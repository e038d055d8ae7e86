#!/usr/bin/env bash
# Install what this project needs, skipping what is already there (safe to re-run):
#   1. Open MPI, cmake and a C++ compiler from Debian packages, if mpirun/mpicxx are missing
#      (in the background, beside step 2; step 3 waits for them);
#   2. a virtual environment .venv with requirements.txt (re-installed only when the file changes);
#   3. Horovod 0.28.1 built from source by tools/build_horovod.sh (wheel cached per torch version).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*"; }

# Debian's packages are only needed to build Horovod (step 3); they install in the background
# while pip installs the wheels (on a fresh machine this saves the shorter of the two).
apt_pid=""
apt_log=$(mktemp)
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null || ! command -v cmake >/dev/null; then
  say "installing Open MPI, cmake and build tools from Debian packages (in the background)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ( $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      --no-install-recommends openmpi-bin libopenmpi-dev cmake build-essential ) >"$apt_log" 2>&1 &
  apt_pid=$!
else
  say "Open MPI $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}') present"
fi
wait_for_apt() {
  [ -n "$apt_pid" ] || return 0
  if ! wait "$apt_pid"; then
    cat "$apt_log" >&2
    echo "setup: ERROR: installing Debian's openmpi-bin libopenmpi-dev cmake build-essential failed (above)" >&2
    exit 1
  fi
  say "Debian packages installed: Open MPI $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}')"
  apt_pid=""
}
trap 'rm -f "$apt_log"' EXIT

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

wait_for_apt
PATH="$PWD/.venv/bin:$PATH" PYTHON=.venv/bin/python tools/build_horovod.sh
