"""SIGTERM under real mpirun: every rank stops at one agreed step, checkpoints, exits 75; rerunning the
same command ends bitwise equal to a run that was never interrupted (CPU).

The signal is sent by a rank to itself after a chosen optimizer step (tests/mpi_scripts/fault_inject.py),
so each case lands in a known place: SWAP phase 1, SWAP phase 2, and inside an HWA window
(mid-cycle, mid-epoch, with averages already in the window). "One rank" signals rank 1 only: rank 0
learns of it through the per-step agreement, and a missing agreement would leave one rank waiting in
a collective (the test's timeout) or stop the ranks at different steps (a bitwise mismatch).
"""
import json
from pathlib import Path

import pytest
import torch
import yaml

from mpi_util import _show, run_mpi
from swa_lib.loop import PREEMPTED_EXIT_CODE

SCRIPT = Path(__file__).parent / "mpi_scripts" / "fault_inject.py"
RANKS = 2

BASE = {"data": {"dataset": "cifar10_jpg", "train_subset": 128, "test_subset": 100},
        "model": {"name": "tiny_cnn_bn"}, "optim": {"batch_size": 16, "lr": 0.05},
        "schedule": {"kind": "linear"}, "eval": {"batch_size": 100, "bn_update_batches": 2},
        "run": {"progress": False, "channels_last": False}}
# 2 ranks: SWAP phase 1 = 2 epochs x 4 steps (global batch 32), phase 2 = 1 epoch x 16 steps per
# worker (K = 2 workers of one process, batch 8). HWA: K = 2 groups of one process, 8 steps an epoch,
# a cycle every 4 steps, a window of 2 cycles.
METHODS = {
    "swap": {"method": {"name": "swap", "workers": 2, "phase2_epochs": 1, "phase2_batch_size": 8,
                        "phase2_lr": 0.02}, "schedule": {"epochs": 3}},
    "hwa": {"method": {"name": "hwa", "groups": 2, "sync_period_steps": 4, "window_cycles": 2},
            "schedule": {"epochs": 2}},
    "sgd": {"method": {"name": "sgd"}, "schedule": {"epochs": 2}},
}
# (step, phase at that step, checkpoint tag it must leave): SWAP step 3 = epoch 0 batch 3 of 4;
# step 13 = phase 2, epoch 2 batch 5 of 16; HWA step 11 = epoch 1 batch 3 of 8, 2 cycles done.
STOPS = {"swap": [(3, "phase1", "e0000-phase1-b00003"), (13, "phase2", "e0002-phase2-b00005")],
         "hwa": [(11, "train", "e0001-train-b00003")]}


def write_config(directory: Path, method: str, extra: dict | None = None, name: str | None = None) -> Path:
    """BASE + METHODS[method] (+ `extra`, section by section) as a YAML file in `directory`."""
    cfg = {k: dict(v) for k, v in BASE.items()}
    for section, values in [*METHODS[method].items(), *(extra or {}).items()]:
        cfg.setdefault(section, {}).update(values)
    path = directory / f"{name or method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, run_dir: Path, fault="none", ranks="all", step=0):
    return run_mpi(RANKS, SCRIPT, [fault, ranks, step, "--config", config, "--run-dir", run_dir],
                   timeout_s=900, check=False)  # a hang fails; a loaded machine is slow


def _finals(run_dir: Path) -> dict:
    return {name: torch.load(run_dir / name) for name in ("final_model.pt", "final_train_model.pt")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights of each method's run that no signal touched (computed once)."""
    cache = {}

    def get(method: str) -> dict:
        if method not in cache:
            tmp = tmp_path_factory.mktemp(f"ref-{method}")
            result = _run(write_config(tmp, method), tmp / "run")
            assert result.returncode == 0, _show(result)
            cache[method] = _finals(tmp / "run")
        return cache[method]

    return get


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("who", ["1", "all"], ids=["one-rank", "all-ranks"])
@pytest.mark.parametrize("method", ["swap", "hwa"])
def test_sigterm_checkpoints_at_an_agreed_step_and_the_rerun_is_bitwise_uninterrupted(
        tmp_path, uninterrupted, method, who):
    config, run_dir = write_config(tmp_path, method), tmp_path / "run"
    for step, phase, tag in STOPS[method]:
        result = _run(config, run_dir, "sigterm", who, step)
        shown = _show(result)
        assert result.returncode == PREEMPTED_EXIT_CODE, shown
        assert f"INJECT sigterm rank=1 step={step} phase={phase}" in result.stdout, shown
        assert "preempted: stopped by a signal" in result.stderr, shown
        assert "run the same command again" in result.stderr, shown
        pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
        assert pointer["tag"] == tag, f"stopped at {pointer['tag']}, expected {tag} (the signalled step)\n{shown}"
        for rank in range(RANKS):  # every rank stopped after the same step
            state = torch.load(run_dir / "checkpoints" / tag / f"rank{rank}.pt", weights_only=False)
            assert state["step"] == step and state["in_epoch"]["batches_done"] == int(tag[-5:]), shown
        assert not (run_dir / "final_model.pt").exists()
    result = _run(config, run_dir)  # the same command, without a fault
    assert result.returncode == 0, _show(result)
    assert f"batch {STOPS[method][-1][2][-5:].lstrip('0')} of the epoch" in result.stdout, _show(result)
    for name, reference in uninterrupted(method).items():
        resumed = _finals(run_dir)[name]
        for key, value in reference.items():
            assert torch.equal(resumed[key], value), f"{name} {key} differs from the uninterrupted run"
