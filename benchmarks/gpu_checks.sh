#!/usr/bin/env bash
# The GPU figures issues 5 (SWALP) and 7 (LAWA/EMA) ask for, in one command that fits one
# 10-minute device call (about 3-4 minutes, most of it compiling the fused kernels).
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      # default OUT_DIR: results
#
# Needs a CUDA GPU and python3 with torch, torchvision and Triton; no Horovod, no MPI, no
# data (both benchmarks use random tensors). Writes OUT_DIR/quantize_gpu.md and
# OUT_DIR/averaging_overhead_gpu.md, each with its command, device, commit and date, and
# keeps going when one of them fails (the exit status says whether both succeeded).
# On a copy of the tree without .git (as the device tool sends it), name the commit the
# copy was made from, so that the tables record it: SWA_GIT_COMMIT=<hash> bash benchmarks/gpu_checks.sh
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=${1:-$ROOT/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda); assert torch.cuda.is_available()' || exit 1
# SWALP: quantize() (eager and fused) as a fraction of copy bandwidth; the 8-bit step vs fp32.
"$PY" "$ROOT/benchmarks/quantize.py" --device cuda --threads 8 --repeats 20 --train-repeats 20 \
  --batch 128 --out "$OUT/quantize_gpu.md" || status=1
# LAWA/EMA: the update cost per step, on device and with pinned CPU buffers (asynchronous).
"$PY" "$ROOT/benchmarks/averaging_overhead.py" --device cuda --threads 8 --repeats 9 --steps 20 \
  --updates 50 --batch 128 --out "$OUT/averaging_overhead_gpu.md" || status=1
exit $status
