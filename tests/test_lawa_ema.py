"""LAWA and EMA: hand-computed means and recursions, no feedback into training, exact resume."""
from pathlib import Path

import pytest
import torch
from torch import nn

from mpi_util import assert_ranks_said, run_mpi
from swa_lib.averaging import EMA, LAWA, averaged_tensors
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import ConfigError, load_config
from swa_lib.methods import EvalTarget
from swa_lib.time_to_target import time_to_target

TINY = ["data.dataset=cifar10_jpg", "data.train_subset=192", "data.test_subset=200", "model.name=resnet9",
        "model.kwargs={width: 8}", "optim.batch_size=32", "optim.lr=0.05", "schedule.epochs=2",
        "eval.batch_size=100", "eval.bn_update_batches=2", "eval.every_steps=4", "run.progress=false",
        "run.log_every_steps=4"]
AVERAGES = ["method.name=averages", "method.lawa=[{every_steps: 2, window: 3}]",
            "method.ema=[{every_steps: 1, decay: 0.8, warmup: true}]"]


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def set_random_weights_(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """Give every averaged tensor new random values; return them flattened (float64)."""
    with torch.no_grad():
        for t in averaged_tensors(model, include_buffers=True):
            t.copy_(torch.randn(t.shape, generator=generator))
    return torch.cat([t.reshape(-1).double() for t in averaged_tensors(model, True)])


def test_lawa_is_the_mean_of_the_last_window_snapshots_across_ring_wraps():
    model, gen = small_model(), torch.Generator().manual_seed(0)
    lawa = LAWA(model, every_steps=2, window=3)
    snapshots = []
    for step in range(1, 16):  # snapshots at steps 2, 4, ..., 14: 7 of them, the ring wraps twice
        weights = set_random_weights_(model, gen)
        if step % 2 == 0:
            snapshots.append(weights)
        assert lawa.update(model, step) == (step % 2 == 0)
        assert lawa.ready == (len(snapshots) >= 3)
        if len(snapshots) >= 3:
            want = torch.stack(snapshots[-3:]).mean(0)
            torch.testing.assert_close(lawa.average().double(), want, rtol=0, atol=1e-6)
    eval_model = small_model()
    lawa.copy_to(eval_model)
    got = torch.cat([t.reshape(-1).double() for t in averaged_tensors(eval_model, True)])
    torch.testing.assert_close(got, torch.stack(snapshots[-3:]).mean(0), rtol=0, atol=1e-6)


def test_lawa_has_no_mean_before_its_queue_is_full():
    model = small_model()
    lawa = LAWA(model, every_steps=1, window=4)
    for step in range(1, 4):
        lawa.update(model, step)
    assert not lawa.ready
    with pytest.raises(RuntimeError, match="3 of 4 snapshots"):
        lawa.average()


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_hand_recursion(warmup):
    model, gen = small_model(), torch.Generator().manual_seed(1)
    initial = set_random_weights_(model, gen)
    ema = EMA(model, every_steps=3, decay=0.9, warmup=warmup)
    want, k = initial, 0
    for step in range(1, 20):
        weights = set_random_weights_(model, gen)
        ema.update(model, step)
        if step % 3 == 0:
            beta = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9
            want, k = beta * want + (1 - beta) * weights, k + 1
    assert ema.n_updates == 6
    torch.testing.assert_close(ema.average().double(), want, rtol=0, atol=1e-6)


def test_bn_recompute_mode_averages_parameters_only():
    model = small_model()
    lawa = LAWA(model, every_steps=1, window=2, include_buffers=False)
    assert lawa.numel == sum(p.numel() for p in model.parameters())


def fit(tmp_path: Path, name: str, *extra: str):
    trainer = build_trainer(load_config(None, TINY + list(extra)), init_comm("single"), tmp_path / name)
    return trainer, trainer.fit()


def test_averages_never_change_training_and_resume_exactly(tmp_path):
    baseline, _ = fit(tmp_path, "sgd")
    straight, summary = fit(tmp_path, "straight", *AVERAGES, "method.bn=recompute")
    fit(tmp_path, "resumed", *AVERAGES, "method.bn=recompute", "run.stop_after_epochs=1")
    resumed, _ = fit(tmp_path, "resumed", *AVERAGES, "method.bn=recompute")
    # No feedback: the training model and optimizer are bitwise those of plain SGD.
    for (name, a), b in zip(baseline.ctx.model.state_dict().items(),
                            straight.ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: averaging changed the training model"
    momentum = lambda t: [s["momentum_buffer"] for s in t.ctx.optimizer.state_dict()["state"].values()]  # noqa: E731
    assert momentum(baseline) and all(torch.equal(a, b) for a, b in
                                      zip(momentum(baseline), momentum(straight), strict=True))
    # Exact resume: every average's state and every evaluation equal the uninterrupted run's.
    for name, state in straight.strategy.state_dict().items():
        other = resumed.strategy.state_dict()[name]
        for key, value in state.items():
            assert (torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key]), (name, key)
    assert [h["results"] for h in straight.history] == [h["results"] for h in resumed.history]
    # 12 steps: LAWA (nu 2, L 3) is full from step 6, so it is missing from the step-4 evaluation.
    assert "lawa_nu2_L3" not in straight.history[0]["results"] and "lawa_nu2_L3/acc" in summary["final"]
    assert "ema_nu1_b0.8_wu" in straight.history[0]["results"]


def test_an_average_with_its_own_grid_is_evaluated_on_it_and_at_the_end(tmp_path):
    """eval_every_steps: 8 on a grid of 4 over 12 steps (evaluations at steps 4, 6 (epoch end), 8 and 12):
    that average at 8 and 12 only, the other one at every evaluation; the training is the same."""
    ema = ["method.name=averages", "method.ema=[{every_steps: 1, decay: 0.8}]"]
    trainer, summary = fit(tmp_path, "grid", *ema, "method.lawa=[{every_steps: 1, window: 2, eval_every_steps: 8}]")
    steps = {name: [h["step"] for h in trainer.history if name in h["results"]]
             for name in ("model", "lawa_nu1_L2", "ema_nu1_b0.8")}
    assert steps["model"] == steps["ema_nu1_b0.8"] and {4, 6, 8, 12} <= set(steps["model"]), steps
    assert sorted(set(steps["lawa_nu1_L2"])) == [8, 12], steps
    assert "lawa_nu1_L2/acc" in summary["final"]
    everywhere, _ = fit(tmp_path, "everywhere", *ema, "method.lawa=[{every_steps: 1, window: 2}]")
    assert {h["step"] for h in everywhere.history if "lawa_nu1_L2" in h["results"]} >= {4, 6}
    for (name, a), b in zip(everywhere.ctx.model.state_dict().items(),
                            trainer.ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: the evaluation grid changed the training model"
    with pytest.raises(ConfigError) as err:
        load_config(None, TINY + ["method.name=averages", "method.lawa=[{window: 2, eval_every_steps: 6}]",
                                  "method.ema=[{decay: 0.9, eval_every_steps: 0}]"])
    text = str(err.value)
    assert "method.lawa[0].eval_every_steps: 6 must be a multiple of eval.every_steps (4)" in text, text
    assert "method.ema[0].eval_every_steps: 0 must be an integer >= 1" in text, text


def test_evaluation_swap_leaves_training_state_untouched(tmp_path):
    trainer = build_trainer(load_config(None, TINY + AVERAGES), init_comm("single"), tmp_path / "swap")
    c, strategy = trainer.ctx, trainer.strategy
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 7):  # stand-in training: random weights, so averages differ from the model
        set_random_weights_(c.model, gen)
        strategy.after_step(step)
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    rng = torch.get_rng_state()
    targets = strategy.eval_targets()
    assert set(targets) == {"lawa_nu2_L3", "ema_nu1_b0.8_wu"}
    assert all(torch.equal(before[k], v) for k, v in c.model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    for name, target in targets.items():
        assert isinstance(target, EvalTarget) and target.model is not c.model
        flat = torch.cat([t.reshape(-1) for t in averaged_tensors(target.model, True)])
        assert torch.equal(flat, strategy.averages[name].average())


def test_config_problems_are_all_named():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=lawa", "method.every_steps=0", "method.window=0", "method.bn=keep",
                           "method.buffer_device=gpu"])
    text = str(err.value)
    for where in ("method.every_steps: 0", "method.window: 0", "method.bn: 'keep'", "method.buffer_device: 'gpu'"):
        assert where in text
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=ema", "method.decay=1.0"])
    assert "method.decay: 1.0 must be in (0, 1)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=averages", "method.lawa=[{every_steps: 0, window: 2}, {window: 2, bn: x}]",
                           "method.ema=[{decay: 0.9}, {decay: 0.9}]"])
    text = str(err.value)
    assert "method.lawa[0].every_steps: 0 must be >= 1" in text and "method.lawa[1]:" in text
    assert "the average ema_nu64_b0.9 is listed twice" in text


def test_time_to_target_is_the_first_evaluation_at_or_above_the_target():
    def record(step, wall, eval_s, accs):
        return {"step": step, "wall_s": wall, "timers": {"eval": eval_s, "checkpoint": 1.0, "train": 99.0},
                "results": {n: {"acc": a} for n, a in accs.items()}}

    history = [record(10, 20.0, 2.0, {"model": 0.5}), record(20, 40.0, 6.0, {"model": 0.7, "lawa": 0.8}),
               record(30, 60.0, 10.0, {"model": 0.8, "lawa": 0.79})]
    got = time_to_target(history, 0.8)
    assert got["lawa"] == {"step": 20, "train_s": 33.0, "wall_s": 40.0}
    assert got["model"] == {"step": 30, "train_s": 49.0, "wall_s": 60.0}
    assert time_to_target(history, 0.9) == {"model": None, "lawa": None}


@pytest.mark.timeout(300)
def test_data_parallel_ranks_hold_identical_averages(tmp_path):
    script = Path(__file__).parent / "mpi_scripts" / "lawa_ema_oracles.py"
    result = run_mpi(2, script, ["oracle", tmp_path], timeout_s=280)
    assert_ranks_said(result, 2, "LAWA_EMA_OK")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np", [2, 4])
def test_with_bn_average_every_rank_holds_the_same_average_and_saves_it(tmp_path, np):
    script = Path(__file__).parent / "mpi_scripts" / "lawa_ema_oracles.py"
    result = run_mpi(np, script, ["bn", tmp_path], timeout_s=280)
    assert_ranks_said(result, np, "LAWA_EMA_BN_OK")
