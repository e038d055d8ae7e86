"""Refactors must not change the numbers: one short fixed-seed CPU run per method against golden values.

tests/golden/refactor_guard.json was written by tests/mpi_scripts/guard_run.py at the commit
before the structural refactor of issue 17 (SWAP and HWA under mpirun with 2 processes). Every
evaluated model of each run (the training model and each average) is compared:

- always: state-dict keys, integer buffers (step counters, n_averaged) exactly, and the sum,
  norm and 16 random projections of all floats to a tolerance far below what a changed average
  produces but above what another CPU's rounding does in these few steps;
- on a machine whose numerics fingerprint (swa_lib.run_log.numerics_record: CPU, kernels,
  torch build, threads) equals the recorded one: the sha256 of every byte as well.

To record new golden values after an intended change of the numbers:
    SWA_GUARD_WRITE=1 python -m pytest tests/test_refactor_guard.py
"""
import json
import math
import os
from pathlib import Path

import pytest

from mpi_util import PYTHON, REPO_ROOT, run_job, run_mpi

SCRIPT = Path(__file__).parent / "mpi_scripts" / "guard_run.py"
GOLDEN = Path(__file__).parent / "golden" / "refactor_guard.json"
TWO_PROCESSES = {"swap", "hwa"}
METHODS = ["sgd", "swa", "swalp", "lawa", "ema", "lawa_recompute", "swap", "hwa"]
# Relative to the norm of the weights: a few steps on another CPU move them by ~1e-7 of it,
# one snapshot more or less in an average of three by ~1e-2.
TOLERANCE = 1e-5


def run_guard(method: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{method}.json"
    env = {"OMP_NUM_THREADS": "1"}
    if method in TWO_PROCESSES:
        run_mpi(2, SCRIPT, [method, out], timeout_s=400, env=env)
    else:
        run_job([PYTHON, SCRIPT, method, out], timeout_s=400, env=env, cwd=REPO_ROOT)
    return json.loads(out.read_text())


def close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE * max(scale, 1.0))


@pytest.mark.timeout(450)
@pytest.mark.parametrize("method", METHODS)
def test_final_weights_match_the_pre_refactor_run(method, tmp_path):
    got = run_guard(method, tmp_path)
    if os.environ.get("SWA_GUARD_WRITE"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[method] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote golden values of {method}")
    want = json.loads(GOLDEN.read_text())[method]
    assert got["steps"] == want["steps"]
    assert sorted(got["weights"]) == sorted(want["weights"]), "the set of evaluated models changed"
    assert want["weights"], "no weights recorded"
    same_numerics = got["numerics"] == want["numerics"]
    for name, w in want["weights"].items():
        g = got["weights"][name]
        assert g["keys"] == w["keys"] and g["numel"] == w["numel"] and g["ints"] == w["ints"], name
        scale = w["norm"]
        assert len(g["projections"]) == len(w["projections"]) > 0
        for label, a, b in [("sum", g["sum"], w["sum"]), ("norm", g["norm"], w["norm"]),
                            *(("projection", a, b) for a, b in zip(g["projections"], w["projections"], strict=True))]:
            assert close(a, b, scale), f"{method}/{name}: {label} {a} differs from the recorded {b}"
        if same_numerics:
            assert g["sha256"] == w["sha256"], f"{method}/{name}: not bitwise equal on the recording machine"
    if same_numerics:
        assert got["output_acc"] == want["output_acc"]
