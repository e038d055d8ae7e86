"""SWAP: phases, averaging, BN recompute, resume and worker death under real mpirun; bad input."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mpi_util import MPIRUN, PYTHON, REPO_ROOT, assert_ranks_said, run_mpi
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import ConfigError, load_config

SCRIPT = Path(__file__).parent / "mpi_scripts" / "swap_oracles.py"
ENTRY = REPO_ROOT / "experiments" / "swap_cifar.py"
BASE = ["data.dataset=cifar10_jpg", "data.train_subset=128", "data.test_subset=100", "model.name=resnet9",
        "model.kwargs={width: 4}", "optim.batch_size=32", "schedule.epochs=3", "eval.batch_size=100",
        "eval.bn_update_batches=2", "run.progress=false"]
TINY = BASE + ["method.workers=1", "method.phase2_epochs=1", "method.phase2_batch_size=16"]


@pytest.mark.timeout(300)
def test_phases_average_bn_and_resume_against_oracles_on_4_ranks(tmp_path):
    assert_ranks_said(run_mpi(4, SCRIPT, ["phases", tmp_path], timeout_s=280), 4, "SWAP_PHASES_OK")


@pytest.mark.timeout(300)
def test_a_worker_killed_in_phase_2_stops_the_job_and_the_same_command_resumes(tmp_path):
    killed = run_mpi(4, SCRIPT, ["kill", tmp_path], timeout_s=120, check=False)
    assert killed.returncode != 0 and "SWAP_RESUME_OK" not in killed.stdout
    assert "rank 2" in killed.stderr + killed.stdout, killed.stderr[-2000:]  # mpirun names the dead rank
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["tag"].endswith("-phase2"), latest  # phase 1 is not redone
    for rank in range(4):  # the last generation is complete and readable
        torch.load(tmp_path / "checkpoints" / latest["tag"] / f"rank{rank}.pt", weights_only=False)
    resumed = run_mpi(4, SCRIPT, ["resume", tmp_path], timeout_s=150)
    assert_ranks_said(resumed, 4, "SWAP_RESUME_OK")


def test_one_process_swap_is_one_worker_whose_average_is_itself(tmp_path):
    trainer = build_trainer(load_config(None, TINY, default_method="swap"), init_comm("single"), tmp_path)
    summary = trainer.fit()
    assert trainer.strategy.phase1_end["rule"] == "epoch_cap" and summary["epochs"] == 3
    assert summary["final"]["swap/phase1_stopped_by_accuracy"] == 0.0  # the tables' "phase 1 ended" columns
    assert summary["final"]["swap/phase1_end_epoch"] == 3 - trainer.cfg.method.phase2_epochs
    for a, b in zip(trainer.ctx.model.parameters(), trainer.strategy.average.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (tmp_path / "final_model.pt").exists() and summary["output_name"] == "swap"


def test_phase_1_stops_at_the_first_epoch_whose_training_accuracy_reaches_the_threshold(tmp_path):
    probe = build_trainer(load_config(None, BASE + ["method.name=sgd"]), init_comm("single"), tmp_path / "sgd")
    probe.fit()
    accs = [json.loads(line) for line in (tmp_path / "sgd" / "metrics.jsonl").read_text().splitlines()]
    accs = [100 * r["train/epoch_acc"] for r in accs if "train/epoch_acc" in r]
    threshold = (accs[0] + accs[1]) / 2 if accs[1] > accs[0] else None  # crossed in epoch 2, not 1
    if threshold is None:
        pytest.fail(f"the probe's training accuracy did not rise between epochs 1 and 2: {accs}")
    swap = build_trainer(load_config(None, TINY + ["schedule.epochs=4", "method.phase2_epochs=1",
                                                   f"method.stop_accuracy={threshold}"], default_method="swap"),
                         init_comm("single"), tmp_path / "swap")
    summary = swap.fit()
    # Phase 1 is SGD with the same seed and batch up to its end, so it sees the same accuracies.
    assert swap.strategy.phase1_end["epoch"] == 2 and swap.strategy.phase1_end["rule"] == "stop_accuracy"
    assert swap.strategy.phase1_end["train_acc"] == pytest.approx(accs[1])
    final = summary["final"]
    assert (final["swap/phase1_end_epoch"], final["swap/phase1_stopped_by_accuracy"]) == (2.0, 1.0)
    assert final["swap/phase1_end_train_acc_pct"] == pytest.approx(accs[1])


def test_phase_3_average_and_bn_recompute_count_as_training_time(tmp_path, monkeypatch):
    import swa_lib.methods.swap as swap_module
    average = swap_module.recompute_bn_

    def slow_average(*args, **kwargs):  # phase 3 (its BN recompute) made measurably long
        time.sleep(1.0)
        return average(*args, **kwargs)

    monkeypatch.setattr(swap_module, "recompute_bn_", slow_average)
    trainer = build_trainer(load_config(None, TINY, default_method="swap"), init_comm("single"), tmp_path)
    final = trainer.fit()["final"]
    phases = [final[f"time/phase/phase{k}"] for k in (1, 2, 3)]
    assert phases[2] >= 1.0, phases
    # "train" wraps every phase, phase 3 included (nested timers: it can only be a little longer).
    assert sum(phases) <= final["time/train"] <= sum(phases) + 0.5, (final["time/train"], phases)


@pytest.mark.parametrize("override, field", [
    ("method.stop_accuracy=0", "method.stop_accuracy"), ("method.stop_accuracy=101", "method.stop_accuracy"),
    ("method.phase2_epochs=3", "method.phase2_epochs"), ("method.on_worker_failure=retry", "method.on_worker_failure"),
    ("method.phase2_schedule=step", "method.phase2_schedule")])
def test_bad_swap_fields_are_named_before_training(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, TINY + [override], default_method="swap")


def _cli(tmp_path, *overrides, np=1):
    cmd = [PYTHON, str(ENTRY), "--config", str(REPO_ROOT / "configs/swap/cifar10_resnet9_swap_smoke.yaml"),
           "--run-dir", str(tmp_path), *TINY, *overrides]
    if np > 1:
        cmd = [*MPIRUN, "-np", str(np), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)


@pytest.mark.timeout(300)
def test_workers_that_do_not_divide_the_world_exit_2_before_training(tmp_path):
    result = _cli(tmp_path, "method.workers=3", np=2)
    assert result.returncode != 0
    assert "method.workers: 3 workers do not divide the 2 launched processes" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.timeout(300)
def test_a_phase_2_batch_not_smaller_than_phase_1_warns_and_a_missing_phase_checkpoint_is_named(tmp_path):
    paused = _cli(tmp_path, "method.phase2_batch_size=32", "run.stop_after_epochs=2")
    assert paused.returncode == 0, paused.stderr[-2000:]
    assert "warning: SWAP phase-2 worker batch 32" in paused.stdout and "defeats the method" in paused.stdout
    tag = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["tag"]
    assert tag == "e0002-phase2"
    (tmp_path / "checkpoints" / tag / "rank0.pt").unlink()
    resumed = _cli(tmp_path, "method.phase2_batch_size=32")
    assert resumed.returncode == 1
    assert f"checkpoints/{tag}/rank0.pt cannot be read" in resumed.stderr, resumed.stderr[-2000:]


@pytest.mark.timeout(300)
def test_average_survivors_averages_the_workers_that_finished(tmp_path):
    # Open MPI must not kill the survivors when a peer dies (documented in swa_lib/methods/swap.py).
    result = run_mpi(4, SCRIPT, ["survivors-kill", tmp_path], timeout_s=200, check=False,
                     mpirun_args=("--mca", "orte_abort_on_non_zero_status", "0"))
    assert result.returncode != 0, "mpirun should report the dead rank"
    shown = f"no survivors.json\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "survivors.json").exists(), shown
    report = json.loads((tmp_path / "survivors.json").read_text())
    assert report["averaged_workers"] == [0, 1, 3] and report["lost_workers"] == [2], report
    assert "averaged the 3 survivors [0, 1, 3]" in result.stdout, result.stdout[-3000:]
    workers = [torch.load(tmp_path / "phase2" / f"worker{k}.pt") for k in (0, 1, 3)]
    average = torch.load(tmp_path / "final_model.pt")
    for name, value in average.items():
        if "running" not in name and "num_batches" not in name:
            expected = torch.stack([w[name] for w in workers]).mean(0)
            assert torch.allclose(value, expected, atol=1e-6), name
    assert not (tmp_path / "phase2" / "worker2.pt").exists()


@pytest.mark.timeout(300)
def test_average_survivors_leaves_out_a_worker_whose_loss_turned_nan(tmp_path):
    result = run_mpi(4, SCRIPT, ["survivors-nan", tmp_path], timeout_s=200, check=False,
                     mpirun_args=("--mca", "orte_abort_on_non_zero_status", "0"))
    assert "NonFiniteLossError" in result.stderr and "[rank 2] FAILED" in result.stderr, result.stderr[-3000:]
    shown = f"no survivors.json\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "survivors.json").exists(), shown
    report = json.loads((tmp_path / "survivors.json").read_text())
    assert report["averaged_workers"] == [0, 1, 3] and report["lost_workers"] == [2], report
    assert not (tmp_path / "phase2" / "worker2.pt").exists()
    average = torch.load(tmp_path / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in average.values() if v.is_floating_point())


@pytest.mark.timeout(300)
def test_average_survivors_with_every_worker_alive_is_ordinary_swap(tmp_path):
    result = run_mpi(4, SCRIPT, ["survivors-all", tmp_path], timeout_s=200)
    assert_ranks_said(result, 4, "SWAP_RESUME_OK")
    assert sorted(p.name for p in (tmp_path / "phase2").iterdir()) == [f"worker{k}.pt" for k in range(4)]
    assert not (tmp_path / "survivors.json").exists()
