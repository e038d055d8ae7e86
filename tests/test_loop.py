"""The training loop on real CIFAR-10 (a small subset): resume, SWA, NaN guard, exported weights."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from swa_lib.averaging import update_bn_
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import ConfigError, load_config
from swa_lib.run_log import run_commits

ROOT = Path(__file__).resolve().parents[1]

TINY = ["data.dataset=cifar10_jpg", "data.train_subset=320", "data.test_subset=200",
        "model.name=resnet9", "model.kwargs={width: 8}", "optim.batch_size=32", "optim.lr=0.05",
        "schedule.epochs=3", "eval.batch_size=100", "eval.bn_update_batches=3", "run.progress=false",
        "run.log_every_steps=4"]
SWA = ["method.name=swa", "method.swa_start_epoch=1", "method.swa_lr=0.02"]


def make(tmp_path, name, *extra):
    cfg = load_config(None, TINY + SWA + list(extra))
    return build_trainer(cfg, init_comm("single"), tmp_path / name)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    straight = make(tmp_path, "straight")
    straight.fit()
    first = make(tmp_path, "resumed", "run.stop_after_epochs=1")
    first.fit()
    assert first.ctx.epoch == 1
    info = tmp_path / "resumed" / "run_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "git_commit": "0ld"}))  # as if from an older commit
    second = make(tmp_path, "resumed")  # fresh objects, as after a kill
    second.fit()
    # run_info.json keeps the first start's commit: the reproduce harness reuses a run only if every
    # start's code is HEAD's (tests/test_reproduce.py), and a table names all of them.
    assert run_commits(json.loads(info.read_text())) == ["0ld", json.loads(info.read_text())["git_commit"]]
    assert "earlier_starts" not in json.loads((tmp_path / "straight" / "run_info.json").read_text())
    assert second.ctx.step == straight.ctx.step
    for (name, a), b in zip(straight.ctx.model.state_dict().items(),
                            second.ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    for a, b in zip(straight.strategy.average.parameters(), second.strategy.average.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight.history[-1]["results"] == second.history[-1]["results"]


def test_swa_is_the_equal_mean_of_the_epoch_end_weights(tmp_path):
    trainer = make(tmp_path, "swa")
    snapshots = []
    after_epoch = trainer.strategy.after_epoch

    def record(epoch, metrics):
        after_epoch(epoch, metrics)
        snapshots.append([p.detach().clone() for p in trainer.ctx.model.parameters()])

    trainer.strategy.after_epoch = record
    trainer.fit()
    assert len(snapshots) == 3 and trainer.strategy.average.n_averaged.item() == 3  # swa_start_epoch=1
    averaged = list(trainer.strategy.average.module.parameters())
    assert averaged and all(len(s) == len(averaged) for s in snapshots)
    for i, p in enumerate(averaged):
        want = torch.stack([s[i] for s in snapshots]).mean(0)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)


def test_dense_swa_is_the_mean_of_the_weights_every_n_steps_over_the_same_iterates(tmp_path):
    # 10 steps an epoch: the dense average takes the end of epoch 1 (step 10), then steps 12, 16,
    # 20 (also an epoch end, taken once), 24 and 28; the per-epoch average is untouched by it.
    trainer = make(tmp_path, "dense", "method.dense_every_steps=4")
    plain = make(tmp_path, "plain")
    plain.fit()
    taken = {}
    after_step, after_epoch = trainer.strategy.after_step, trainer.strategy.after_epoch

    def weights():
        return [p.detach().clone() for p in trainer.ctx.model.parameters()]

    def on_step(step):
        after_step(step)
        taken[step] = weights()

    def on_epoch(epoch, metrics):
        after_epoch(epoch, metrics)
        taken[f"e{epoch + 1}"] = weights()

    trainer.strategy.after_step, trainer.strategy.after_epoch = on_step, on_epoch
    trainer.fit()
    dense = trainer.strategy.dense
    assert dense.n_averaged.item() == 6
    for i, p in enumerate(dense.module.parameters()):
        want = torch.stack([taken[k][i] for k in (10, 12, 16, 20, 24, 28)]).mean(0)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    # Same iterates and the same per-epoch average as a run without it.
    for a, b in zip(plain.strategy.average.parameters(), trainer.strategy.average.parameters(), strict=True):
        assert torch.equal(a, b)
    final = trainer.history[-1]["results"]
    assert set(final) == {"model", "swa", "swa_dense"} and final["swa"] == plain.history[-1]["results"]["swa"]
    summary = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert summary["final"]["swa_dense/snapshots"] == 6 and summary["final"]["swa/snapshots"] == 3
    # A kill after epoch 1 resumes the dense average exactly.
    make(tmp_path, "resumed", "method.dense_every_steps=4", "run.stop_after_epochs=2").fit()
    resumed = make(tmp_path, "resumed", "method.dense_every_steps=4")
    resumed.fit()
    for a, b in zip(dense.parameters(), resumed.strategy.dense.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dense_every_steps_must_be_positive():
    with pytest.raises(ConfigError, match="method.dense_every_steps: 0"):
        load_config(None, TINY + SWA + ["method.dense_every_steps=0"])


def test_swa_learning_rate_takes_over_at_swa_start(tmp_path):
    trainer = make(tmp_path, "lr", "method.swa_start_epoch=2", "schedule.kind=cosine")
    s = trainer.strategy
    assert s.lr(0.5) == pytest.approx(trainer.ctx.lr_fn(0.5))
    assert s.lr(2.0) == pytest.approx(0.02) and s.lr(2.7) == pytest.approx(0.02)


def test_exported_weights_load_into_a_plain_model_and_give_the_reported_accuracy(tmp_path):
    trainer = make(tmp_path, "export")
    summary = trainer.fit()
    state = torch.load(tmp_path / "export" / "final_model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    plain = models.build_model("resnet9", 10, width=8).to(memory_format=torch.channels_last)
    plain.load_state_dict(state, strict=True)
    # Re-evaluate independently of the loop: this is the accuracy the summary must report.
    plain.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in trainer.workload.test_loader(0, 1):
            correct += (plain(x).argmax(1) == y).sum().item()
            count += len(y)
    assert count == 200
    assert summary["final"]["output/acc"] == pytest.approx(correct / count)
    assert summary["output_name"] == "swa"
    info = json.loads((tmp_path / "export" / "run_info.json").read_text())
    assert info["config"]["method"]["name"] == "swa" and info["world_size"] == 1 and info["git_commit"]
    assert (tmp_path / "export" / "tb").is_dir()


def test_precision_bf16_trains_under_autocast_and_evaluates_averages_in_fp32(tmp_path):
    out_dtypes = {}

    def watch(trainer):
        for name, model in (("model", trainer.ctx.model), ("swa", trainer.strategy.average.module)):
            out_dtypes[name] = set()
            model.register_forward_hook(lambda m, i, o, name=name: out_dtypes[name].add(o.dtype))
        return trainer.fit()

    summary = watch(make(tmp_path, "bf16", "run.precision=bf16"))
    # Training steps and the training model's evaluation ran under bf16 autocast; the average's
    # BN recompute and evaluation did not.
    assert out_dtypes == {"model": {torch.bfloat16}, "swa": {torch.float32}}
    assert summary["precision"] == {"training": "bf16", "averaged_models": "fp32"}
    info = json.loads((tmp_path / "bf16" / "run_info.json").read_text())
    assert info["precision"] == summary["precision"] and info["config"]["run"]["precision"] == "bf16"

    summary = watch(make(tmp_path, "default"))
    assert out_dtypes == {"model": {torch.float32}, "swa": {torch.float32}}
    assert summary["precision"] == {"training": "fp32", "averaged_models": "fp32"}


def test_eval_every_steps_above_an_epoch_must_be_whole_epochs_of_the_real_loader(tmp_path):
    # 330 images at batch 32: 10 full batches; the partial 11th is dropped (a hand count of 11 is wrong).
    base = ["data.train_subset=330", "schedule.epochs=1", "run.checkpoint_every_epochs=0"]
    with pytest.raises(ConfigError) as err:
        make(tmp_path, "drift", *base, "eval.every_steps=22")
    text = str(err.value)
    assert "eval.every_steps: 22" in text and "an epoch here is 10 steps" in text and "use 20 (2 epochs)" in text
    for fine in (20, 30, 4, 7):  # whole epochs, or a grid inside one epoch
        assert make(tmp_path, f"ok{fine}", *base, f"eval.every_steps={fine}").cfg.eval.every_steps == fine


@pytest.mark.parametrize("name", ["sgd", "lawa", "ema"])
def test_averaging_paper_configs_evaluate_on_whole_epochs_of_full_cifar10(name):
    cfg = load_config(ROOT / "configs" / "averaging" / f"cifar10_resnet18_{name}_paper.yaml")
    steps_per_epoch = 50_000 // cfg.optim.batch_size  # 390: the last partial batch is dropped
    assert cfg.eval.every_steps == cfg.eval.every_epochs * steps_per_epoch


def test_update_bn_on_one_process_matches_a_hand_computed_cumulative_average():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    update_bn_(model, batches)
    feats = [model[0](b).detach() for b in batches]
    want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, want_mean)
    torch.testing.assert_close(model[1].running_var, want_var)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_with_a_diagnostic_and_keeps_the_last_checkpoint(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "baselines.py"), "--config",
           str(ROOT / "configs" / "baselines" / "cifar10_resnet9_sgd_smoke.yaml"), "--run-dir", str(tmp_path / "r"),
           *TINY]
    ok = subprocess.run(cmd + ["run.stop_after_epochs=1"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    ckpt_dir = tmp_path / "r" / "checkpoints"
    pointer = json.loads((ckpt_dir / "latest.json").read_text())
    saved = ckpt_dir / pointer["tag"] / "rank0.pt"
    before = _sha(saved)
    # The same command resumed, with the weights turned to NaN after its first step (step 11): the
    # same config, so run identity lets it resume (a changed optim.lr would now be refused, exit 2).
    inject = [sys.executable, str(ROOT / "tests" / "mpi_scripts" / "fault_inject.py"), "nan", "0", "11", *cmd[2:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    bad = subprocess.run(inject, capture_output=True, text=True, timeout=300, env=env)
    assert "INJECT nan rank=0 step=11" in bad.stdout, bad.stdout + bad.stderr
    assert bad.returncode == 1, bad.stderr
    assert "NonFiniteLossError" in bad.stderr and "last good checkpoint" in bad.stderr, bad.stderr
    assert json.loads((ckpt_dir / "latest.json").read_text()) == pointer
    assert _sha(saved) == before
    torch.load(saved, weights_only=False)  # still readable


def test_two_processes_with_the_same_threads_train_bitwise_equal_weights(tmp_path):
    # README, "What is reproducible": same CPU, thread count and torch build give the same bits,
    # and run_info.json records what that depends on (results/determinism_cpu.md measured each).
    from swa_lib.run_log import KERNEL_ENV
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "experiments" / "baselines.py"), "--config",
           str(ROOT / "configs" / "baselines" / "cifar10_resnet9_sgd_smoke.yaml"), *TINY, "schedule.epochs=1"]
    for name in ("a", "b"):
        done = subprocess.run(cmd + ["--run-dir", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    a, b = (torch.load(tmp_path / n / "final_train_model.pt", weights_only=True) for n in ("a", "b"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between two identical runs"
    numerics = [json.loads((tmp_path / n / "run_info.json").read_text())["numerics"] for n in ("a", "b")]
    assert numerics[0] == numerics[1]
    assert numerics[0]["torch_threads"] == 1 and numerics[0]["kernel_env"] == {"OMP_NUM_THREADS": "1"}
    assert numerics[0]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert numerics[0]["torch_build"].startswith(torch.__version__)
    assert numerics[0]["cpu"]["family_model_stepping"].count("/") == 2 and numerics[0]["cpu"]["vendor"]


def test_git_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    # A copy of the tree without .git (as sent to a GPU machine) records the commit it names.
    from swa_lib.run_log import git_commit
    assert git_commit().split("-")[0] == subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.delenv("SWA_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("SWA_GIT_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"
