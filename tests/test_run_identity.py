"""Run identity: a default run directory per resolved config, and no resume across configs or world sizes."""
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from mpi_util import PYTHON, REPO_ROOT
from swa_lib.checkpoint import CheckpointManager, check_resumable
from swa_lib.cli import default_run_dir
from swa_lib.comm import init_comm
from swa_lib.config import IDENTITY_NEUTRAL, config_hash, load_config, run_identity

ENTRY = Path(__file__).parent / "mpi_scripts" / "fault_inject.py"  # the CLI, here without a fault
TINY = {"data": {"dataset": "cifar10_jpg", "train_subset": 64, "test_subset": 50},
        "model": {"name": "tiny_cnn_no_bn"}, "optim": {"batch_size": 32}, "schedule": {"epochs": 1},
        "eval": {"batch_size": 50}, "run": {"progress": False, "channels_last": False}}


def test_default_run_directory_names_the_resolved_config():
    base = load_config(None, ["run.seed=1"])
    lr = load_config(None, ["run.seed=1", "optim.lr=0.05"])
    chained = load_config(None, ["run.seed=1", "run.stop_after_epochs=1", "run.progress=false"])
    d = default_run_dir(base, "configs/x.yaml")
    assert d == Path("runs") / f"x-s1-{config_hash(base)}" and len(config_hash(base)) == 8
    assert default_run_dir(lr, "configs/x.yaml") != d  # a sweep's override gets its own run
    assert default_run_dir(chained, "configs/x.yaml") == d  # a chained job continues the same run
    assert default_run_dir(load_config(None, ["run.name=mine"]), "configs/x.yaml") == Path("runs/mine")


def test_identity_leaves_out_only_keys_that_cannot_change_a_result():
    identity = run_identity(load_config(None, []))
    assert not set(IDENTITY_NEUTRAL) & set(identity)
    assert {"optim.lr", "run.seed", "method.name", "data.train_subset", "model.kwargs"} <= set(identity)


def test_check_resumable_names_differing_keys_and_world_size(tmp_path):
    cfg = load_config(None, ["optim.lr=0.1"])
    CheckpointManager(tmp_path, init_comm("single"), config=run_identity(cfg)).save({"i": 1}, "e0001")
    assert check_resumable(tmp_path, run_identity(cfg), 1) == []
    assert check_resumable(tmp_path, run_identity(load_config(None, ["optim.lr=0.1", "run.resume=true",
                                                                     "run.stop_after_epochs=3"])), 1) == []
    other = run_identity(load_config(None, ["optim.lr=0.05", "schedule.epochs=12"]))
    [problem] = check_resumable(tmp_path, other, 1)
    assert "optim.lr: 0.1 in the checkpoint, 0.05 now" in problem
    assert "schedule.epochs: 10 in the checkpoint, 12 now" in problem and "run.seed" not in problem
    [problem] = check_resumable(tmp_path, run_identity(cfg), 4)
    assert "written by 1 processes, but this run has 4" in problem
    assert check_resumable(tmp_path / "nothing-here", other, 4) == []
    assert not (tmp_path / "nothing-here").exists()  # a check writes nothing


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.timeout(600)
def test_resume_with_another_config_exits_2_naming_the_keys_and_touches_nothing(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "run"
    cmd = [PYTHON, str(ENTRY), "none", "all", "0", "--config", str(config), "--run-dir", str(run_dir)]
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=REPO_ROOT, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert pointer["config"]["optim.lr"] == 0.1 and pointer["config"]["model.name"] == "tiny_cnn_no_bn"
    before = _tree(run_dir)
    again = subprocess.run(cmd + ["optim.lr=0.05", "optim.momentum=0.8"], capture_output=True, text=True,
                           timeout=280, cwd=REPO_ROOT, env=env)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "optim.lr: 0.1 in the checkpoint, 0.05 now" in again.stderr, again.stderr[-3000:]
    assert "optim.momentum: 0.9 in the checkpoint, 0.8 now" in again.stderr
    assert str(run_dir / "checkpoints") in again.stderr
    assert _tree(run_dir) == before
