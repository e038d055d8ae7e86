"""HWA: online averaging across groups plus an offline window, against hand computations.

Under real mpirun (4 ranks, K = 2 groups of 2 and K = 4 groups of 1), tests/mpi_scripts/
hwa_oracles.py checks the syncs, the window mean, the M = 1 and H = null limits and resume.
Here, in one process: the K = 1 limit against plain SGD, and the bad-input messages.
"""
import subprocess
from pathlib import Path

import pytest
import torch

from mpi_util import MPIRUN, PYTHON, REPO_ROOT, assert_ranks_said, run_mpi
from swa_lib.averaging import flat_parameters
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import ConfigError, load_config

SCRIPT = Path(__file__).parent / "mpi_scripts" / "hwa_oracles.py"
# 192 images / batch 32 = 6 steps per epoch, 12 steps in all.
TINY = ["data.dataset=cifar10_jpg", "data.train_subset=192", "data.test_subset=100", "model.name=resnet9",
        "model.kwargs={width: 8}", "optim.batch_size=32", "optim.lr=0.05", "schedule.epochs=2",
        "eval.batch_size=100", "eval.every_epochs=2", "eval.bn_update_batches=2", "run.progress=false",
        "run.checkpoint_every_epochs=0"]
HWA = ["method.name=hwa", "method.groups=1", "method.sync_period_steps=2", "method.window_cycles=3"]


def build(tmp_path, name, *extra):
    return build_trainer(load_config(None, TINY + list(extra)), init_comm("single"), tmp_path / name)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("groups", [2, 4])
def test_syncs_window_limits_and_resume_under_mpirun(tmp_path, groups):
    result = run_mpi(4, SCRIPT, [groups, tmp_path], timeout_s=180)
    assert_ranks_said(result, 4, "HWA_ORACLES_OK")


def test_one_group_is_a_sliding_window_average_of_plain_sgd(tmp_path):
    sgd = build(tmp_path, "sgd", "method.name=sgd")
    snapshots = []

    def record(step):  # what a hand-made sliding window would store: SGD's weights every 2 steps
        if step % 2 == 0:
            snapshots.append(flat_parameters(sgd.ctx.model))
    sgd.strategy.after_step = record
    sgd.fit()
    hwa = build(tmp_path, "hwa", *HWA)
    summary = hwa.fit()
    # Offline averaging never feeds back: the training model is SGD's, bit for bit.
    assert torch.equal(flat_parameters(hwa.ctx.model), flat_parameters(sgd.ctx.model))
    assert hwa.strategy.cycles == len(snapshots) == 6
    assert len(hwa.strategy.window) == 3
    assert all(torch.equal(a, b) for a, b in zip(hwa.strategy.window, snapshots[-3:], strict=True))
    hand = torch.stack(snapshots[-3:]).double().mean(0).float()
    assert torch.allclose(flat_parameters(hwa.strategy.average), hand, rtol=0, atol=1e-7)
    assert summary["output_name"] == "hwa" and summary["final"]["output/acc"] == summary["final"]["hwa/acc"]


def test_online_target_is_what_the_same_run_with_a_window_of_one_outputs(tmp_path):
    """eval_online reads the online-only result off an HWA run: the window never feeds back."""
    both = build(tmp_path, "both", *HWA, "method.eval_online=true")
    summary = both.fit()
    online_only = build(tmp_path, "m1", *HWA, "method.window_cycles=1")
    reference = online_only.fit()
    assert torch.equal(flat_parameters(both.strategy.online), flat_parameters(online_only.strategy.average))
    for a, b in zip(both.strategy.online.buffers(), online_only.strategy.average.buffers(), strict=True):
        assert torch.equal(a, b)  # the same BN recompute
    assert summary["final"]["online/acc"] == reference["final"]["hwa/acc"]
    assert summary["final"]["hwa/acc"] == summary["final"]["output/acc"]  # the output is still the window
    assert not torch.equal(flat_parameters(both.strategy.online), flat_parameters(both.strategy.average))


@pytest.mark.parametrize("override, field", [
    ("method.sync_period_steps=0", "method.sync_period_steps"),
    ("method.window_cycles=0", "method.window_cycles"),
    ("method.groups=0", "method.groups"),
    ("method.momentum=drop", "method.momentum"),
    ("method.sync_period_steps=null", "method.window_cycles"),  # no cycles, but a window of 3
])
def test_bad_hwa_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, TINY + HWA + [override])


def test_window_longer_than_the_run_is_an_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"method.window_cycles: 7 is more than the 6 cycles"):
        build(tmp_path, "long", *HWA, "method.window_cycles=7")


def test_a_period_that_leaves_steps_out_of_the_output_warns(tmp_path):
    with pytest.warns(UserWarning, match="leave the last 2 steps out of the output"):
        build(tmp_path, "ragged", *HWA, "method.sync_period_steps=5", "method.window_cycles=2")


def test_groups_that_do_not_divide_the_world_exit_2_before_training(tmp_path):
    # 3 groups on 2 processes: neither one model per process group nor the same number in each process.
    proc = subprocess.run([*MPIRUN, "-np", "2", PYTHON, str(REPO_ROOT / "experiments" / "hwa_cifar.py"),
                           "--config", str(REPO_ROOT / "configs" / "hwa" / "cifar10_resnet9_hwa_smoke.yaml"),
                           "--run-dir", str(tmp_path / "run"), *TINY, "method.groups=3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0, proc.stderr
    assert "method.groups: 3 must divide the world size 2" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hwa_averager_in_an_own_loop_outputs_the_window_mean_with_bn_recomputed():
    """The own-loop API, one process (K = 1): cycles end every H steps, the output is the mean of
    the last M end-of-cycle weights, and its BN statistics are torch's update_bn on the given batches."""
    from torch.optim.swa_utils import update_bn

    from swa_lib.methods import HWAAverager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hwa = HWAAverager(init_comm("single"), model, opt, groups=1, sync_period_steps=3, window_cycles=2)
    ends = []
    for step in range(1, 11):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        if hwa.step(step):
            ends.append((step, flat_parameters(model)))
    assert [s for s, _ in ends] == [3, 6, 9] and hwa.cycles == 3
    output = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    batches = [torch.randn(8, 4) for _ in range(3)]
    assert hwa.output_(output, batches)
    torch.testing.assert_close(flat_parameters(output), (ends[1][1] + ends[2][1]) / 2, rtol=0, atol=1e-7)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    reference.load_state_dict(output.state_dict())
    update_bn(batches, reference)
    torch.testing.assert_close(output[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(output[1].running_var, reference[1].running_var, rtol=0, atol=0)


def test_hwa_averager_rejects_bad_arguments_by_name():
    from swa_lib.methods import HWAAverager

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    comm = init_comm("single")
    with pytest.raises(ValueError, match="momentum='average' acts on the optimizer's momentum: pass the optimizer"):
        HWAAverager(comm, model, groups=2, sync_period_steps=2, window_cycles=1)
    for kwargs, words in ((dict(groups=3, sync_period_steps=2, window_cycles=1), "cannot split world size 1"),
                          (dict(groups=1, sync_period_steps=0, window_cycles=1), "sync_period_steps: 0"),
                          (dict(groups=1, sync_period_steps=2, window_cycles=0), "window_cycles: 0"),
                          (dict(groups=1, sync_period_steps=2, window_cycles=1, momentum="x"), "momentum: 'x'")):
        with pytest.raises(ValueError, match=words):
            HWAAverager(comm, model, opt, **kwargs)
