#!/usr/bin/env bash
# One entry point for this repository. Every command installs what is missing first.
#
#   ./run.sh reproduce baselines --no-records
#                                    train results/baselines_cifar10_reduced.md's runs (the main job)
#   ./run.sh reproduce NAME | all    any table of configs/reproduce/ (swap, swalp, hwa, averaging,
#                                    averaging_tiny, hwa_tiny, the *_ablation ones), or all of them in
#                                    turn (results/README.md gives the total on 2 cores); without
#                                    --no-records, runs with a committed record are restored, not trained
#   ./run.sh test [pytest args]      the whole test suite (what CI runs), or the test files named
#   ./run.sh lint [ruff args]        ruff check . (the style of pyproject.toml; the test suite runs it too)
#   ./run.sh setup                   only install (Open MPI, .venv, Horovod)
#   ./run.sh mpirun -np 4 python experiments/baselines.py --config configs/...
#                                    mpirun with the flags this machine needs; anything a cluster
#                                    user adds (--hostfile, -H, -x VAR, --map-by) is passed through
#   ./run.sh python experiments/...  one process, with the project's environment
#   ./run.sh tensorboard [logdir]    TensorBoard over every run under logdir (default runs/)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

mpirun_flags() {
  local flags=(--oversubscribe --bind-to none -x PATH -x PYTHONPATH)
  # Debian's Open MPI refuses to start as root without this; containers and CI run as root.
  [ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
  echo "${flags[@]}"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) tools/setup.sh ;;
  test)
    tools/setup.sh
    # pytest args; the whole tests/ folder unless a test file or node id is named
    args=("${@:--q}") named=0
    for a in "${args[@]}"; do [[ $a != -* && -e ${a%%::*} ]] && named=1; done
    [ "$named" -eq 1 ] || args+=(tests)
    exec python -m pytest "${args[@]}" ;;
  lint)
    tools/setup.sh >/dev/null
    exec ruff check "${@:-.}" ;;
  reproduce)
    tools/setup.sh
    exec python experiments/reproduce.py "$@" ;;
  mpirun)
    tools/setup.sh >/dev/null
    # shellcheck disable=SC2046
    exec mpirun $(mpirun_flags) "$@" ;;
  python)
    tools/setup.sh >/dev/null
    exec python "$@" ;;
  tensorboard)
    tools/setup.sh >/dev/null
    logdir=${1:-runs}; shift || true
    [ -d "$logdir" ] || { echo "run.sh: no run directory '$logdir' (train something first)" >&2; exit 2; }
    exec tensorboard --logdir "$logdir" "$@" ;;
  help|-h|--help) sed -n '2,/^set /{/^#/p}' "$0" ;;
  *) echo "run.sh: unknown command '$cmd'" >&2; sed -n '2,/^set /{/^#/p}' "$0" >&2; exit 2 ;;
esac
