"""--dry-run: every config prints its plan without loading data; the LRs are the ones training uses."""
import re
import subprocess

import pytest

from mpi_util import MPIRUN, PYTHON, REPO_ROOT
from swa_lib import cli
from swa_lib.comm import init_comm
from swa_lib.config import load_config

METHOD_CONFIGS = sorted(p for d in ("averaging", "baselines", "hwa", "swalp", "swap")
                        for p in (REPO_ROOT / "configs" / d).glob("*.yaml"))
EPOCH_LINE = re.compile(r"^epoch (\d+) lr (\S+) \((\w+)\)$", re.M)


def dry_run(capsys, monkeypatch, config, *args) -> tuple[int, str]:
    def no_data(*a, **k):
        raise AssertionError("--dry-run built a workload (data, model)")

    monkeypatch.setattr("swa_lib.workload.Workload.__init__", no_data)
    code = cli.main(["--config", str(config), "--dry-run", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def lrs(text: str) -> dict[int, tuple[float, str]]:
    return {int(e): (float(lr), phase) for e, lr, phase in EPOCH_LINE.findall(text)}


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_prints_its_plan_and_trains_nothing(config, capsys, monkeypatch, tmp_path):
    code, text = dry_run(capsys, monkeypatch, config, "--run-dir", str(tmp_path / "run"))
    assert code == 0, text
    cfg = load_config(config)
    assert sorted(lrs(text)) == list(range(cfg.schedule.epochs)), text[-2000:]
    assert f"precision: training {cfg.run.precision}, averaged models fp32" in text
    assert re.search(rf"^world: \d+ process\(es\) .*method {cfg.method.name}$", text, re.M), text[:3000]
    assert f"  method:\n    name: {cfg.method.name}" in text  # the resolved config
    assert not (tmp_path / "run").exists()


def test_swa_vgg16_paper_schedule_matches_hand_computed_values(capsys, monkeypatch):
    code, text = dry_run(capsys, monkeypatch, REPO_ROOT / "configs/baselines/cifar10_vgg16_swa_paper.yaml")
    assert code == 0, text
    got = lrs(text)
    # swa_paper, lr 0.05, reference 161, final 0.2: t = e / 161; 1 to t = 0.5, linear to 0.2 by t = 0.9.
    # e = 100: 0.05 * (1 - 0.8 * (100/161 - 0.5) / 0.4) = 0.05 * 0.757764 = 0.0378882.
    # e = 140: 0.05 * (1 - 0.8 * (140/161 - 0.5) / 0.4) = 0.05 * 0.260870 = 0.0130435.
    want = {0: (0.05, "sgd"), 80: (0.05, "sgd"), 100: (0.0378882, "sgd"), 140: (0.0130435, "sgd"),
            160: (0.01, "sgd"), 161: (0.01, "swa"), 299: (0.01, "swa")}
    for epoch, (lr, phase) in want.items():
        assert got[epoch][0] == pytest.approx(lr, rel=1e-5) and got[epoch][1] == phase, (epoch, got[epoch])


def test_swap_paper_plan_shows_the_layout_and_the_phase_2_takeover(capsys, monkeypatch):
    code, text = dry_run(capsys, monkeypatch, REPO_ROOT / "configs/swap/cifar10_resnet9_swap_paper.yaml")
    assert code == 0, text
    # One process holds the 8 workers as in-process models (swa_lib.inprocess).
    assert "world: 1 process(es) (the smallest the method accepts" in text
    assert "phase 2: 8 workers of one model, batch 512 each" in text
    got = lrs(text)
    # Phase 1: linear, warmup 5, cap 24 - 6 = 18 epochs, peak 0.4 x 1024 / 512 = 0.8;
    # e = 11: 0.8 * (1 - 6/13) = 0.430769. Phase 2 from epoch 18: 0.4 linear to 0 over 6 epochs.
    want = {0: (0.0, "phase1"), 1: (0.16, "phase1"), 5: (0.8, "phase1"), 11: (0.430769, "phase1"),
            17: (0.0615385, "phase1"), 18: (0.4, "phase2"), 21: (0.2, "phase2"), 23: (0.0666667, "phase2")}
    for epoch, (lr, phase) in want.items():
        assert got[epoch][0] == pytest.approx(lr, rel=1e-5, abs=1e-12) and got[epoch][1] == phase, (epoch, got[epoch])
    code, text = dry_run(capsys, monkeypatch, REPO_ROOT / "configs/swap/cifar10_resnet9_swap_paper.yaml",
                         "--world-size", "16")
    assert "phase 2: 8 workers of 2 process(es), batch 2 x 512 = 1024 each" in text
    assert lrs(text)[5] == (1.6, "phase1")  # peak 0.4 x 2048 / 512


def test_hwa_plan_names_its_groups(capsys, monkeypatch):
    config = REPO_ROOT / "configs/hwa/tiny_imagenet_resnet9_hwa_reduced.yaml"
    code, text = dry_run(capsys, monkeypatch, config, "--world-size", "2", "method.groups=1", "optim.batch_size=64")
    assert code == 0 and "1 group of 2 process(es), one model each, batch 2 x 64 = 128" in text, text[-2000:]
    code, text = dry_run(capsys, monkeypatch, config, "--world-size", "2")
    assert code == 0 and "2 groups of 1 process(es), one model each, batch 1 x 128 = 128" in text, text[-2000:]


def test_a_world_size_that_does_not_fit_exits_2_with_the_reason(capsys, monkeypatch):
    code, text = dry_run(capsys, monkeypatch, REPO_ROOT / "configs/swap/cifar10_resnet9_swap_paper.yaml",
                         "--world-size", "6")
    assert code == 2 and "method.workers: 8 workers do not divide the 6 launched processes" in text, text
    assert cli.main(["--config", str(METHOD_CONFIGS[0]), "--world-size", "2"]) == 2  # only with --dry-run
    assert "only with --dry-run" in capsys.readouterr().err


TINY = ["data.dataset=cifar10_jpg", "data.train_subset=128", "data.test_subset=100", "model.name=resnet9",
        "model.kwargs={width: 4}", "optim.batch_size=32", "eval.batch_size=100", "eval.bn_update_batches=1",
        "run.progress=false", "run.checkpoint_every_epochs=0"]


@pytest.mark.parametrize("method", [
    ["method.name=swa", "schedule.epochs=4", "schedule.kind=cosine", "method.swa_start_epoch=2",
     "method.swa_lr=0.02", "method.anneal_epochs=1"],
    ["method.name=swap", "schedule.epochs=4", "schedule.kind=linear", "schedule.warmup_epochs=1",
     "method.workers=1", "method.phase2_epochs=2", "method.phase2_batch_size=16", "method.phase2_lr=0.03"]],
    ids=["swa", "swap"])
def test_the_printed_lrs_are_the_ones_the_loop_sets(method, capsys, monkeypatch, tmp_path):
    overrides, config = TINY + method, REPO_ROOT / "configs/baselines/cifar10_resnet9_sgd_smoke.yaml"
    code, text = dry_run(capsys, monkeypatch, config, *overrides)
    assert code == 0, text
    planned = lrs(text)
    monkeypatch.undo()  # the real workload now
    trainer = cli.build_trainer(load_config(config, overrides), init_comm("single"), tmp_path)
    first_step_lr = {}
    train_epoch = trainer._train_epoch

    def record(epoch):
        after_step = trainer.strategy.after_step

        def first(step):
            first_step_lr.setdefault(epoch, trainer.ctx.optimizer.param_groups[0]["lr"])
            after_step(step)

        trainer.strategy.after_step = first
        try:
            return train_epoch(epoch)
        finally:
            trainer.strategy.after_step = after_step

    trainer._train_epoch = record
    trainer.fit()
    assert sorted(first_step_lr) == sorted(planned) == [0, 1, 2, 3]
    for epoch, (lr, phase) in planned.items():
        assert first_step_lr[epoch] == pytest.approx(lr, rel=1e-5, abs=1e-12), (epoch, first_step_lr, planned)


ENTRY_POINTS = [("averaging_cifar", "averaging/cifar10_resnet18_lawa_paper"),
                ("baselines", "baselines/cifar10_vgg16_swa_paper"), ("hwa_cifar", "hwa/cifar100_wrn28_10_hwa_paper"),
                ("swalp_cifar", "swalp/cifar10_vgg16_swalp_paper"), ("swap_cifar", "swap/cifar10_resnet9_swap_paper"),
                ("swap_imagenet", "swap/imagenet_resnet50_swap_paper")]


@pytest.mark.parametrize("entry, config", ENTRY_POINTS, ids=[e for e, _ in ENTRY_POINTS])
def test_every_entry_point_takes_dry_run(entry, config, tmp_path):
    proc = subprocess.run([PYTHON, str(REPO_ROOT / "experiments" / f"{entry}.py"), "--config",
                           str(REPO_ROOT / "configs" / f"{config}.yaml"), "--dry-run"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={"SWA_DATA_ROOT": str(tmp_path / "no-data"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(lrs(proc.stdout)) == load_config(REPO_ROOT / "configs" / f"{config}.yaml").schedule.epochs


@pytest.mark.timeout(300)
def test_under_mpirun_only_rank_0_prints_and_the_launcher_sets_the_world(tmp_path):
    cmd = [*MPIRUN, "-np", "2", PYTHON, str(REPO_ROOT / "experiments" / "baselines.py"), "--config",
           str(REPO_ROOT / "configs/baselines/cifar10_resnet9_sgd_smoke.yaml"), "--dry-run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("world: 2 process(es) (launcher), method sgd") == 1, proc.stdout[-2000:]
    assert proc.stdout.count("epoch 0 lr ") == 1
