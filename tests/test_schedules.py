"""Learning-rate schedules against values computed by hand."""
import math
from pathlib import Path

import pytest

from swa_lib.config import OptimConfig, ScheduleConfig
from swa_lib.schedules import lr_factor, lr_position, peak_lr


def test_cosine_with_warmup():
    s = ScheduleConfig(epochs=10, kind="cosine", warmup_epochs=2, final_lr_fraction=0.1)
    assert lr_factor(s, 0) == 0
    assert lr_factor(s, 1) == pytest.approx(0.5)
    assert lr_factor(s, 2) == pytest.approx(1.0)
    assert lr_factor(s, 6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(s, 10) == pytest.approx(0.1)


def test_step_schedule():
    s = ScheduleConfig(epochs=10, kind="step", milestones_epochs=[3, 6], gamma=0.1)
    assert [lr_factor(s, e) for e in (0, 2.99, 3, 5.5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_swa_paper_schedule_matches_official_formula():
    # timgaripov/swa train.py: t = epoch / swa_start; 1 until t=0.5, linear to ratio at t=0.9.
    s = ScheduleConfig(epochs=300, kind="swa_paper", reference_epochs=161, final_lr_fraction=0.2)
    for epoch in (0, 80, 100, 120, 144, 145, 200, 299):
        t = epoch / 161
        want = 1.0 if t <= 0.5 else (1 - 0.8 * (t - 0.5) / 0.4 if t <= 0.9 else 0.2)
        assert lr_factor(s, epoch) == pytest.approx(want)


def test_linear_scaling_with_batch():
    assert peak_lr(OptimConfig(lr=0.1, lr_reference_batch=256), 512) == pytest.approx(0.2)
    assert peak_lr(OptimConfig(lr=0.1), 512) == 0.1


# Official SWALP LRs (stevenygd/SWALP train.py, set once per epoch e), worked out by hand:
# t = e / swa_start; factor 1 for t <= 0.5, 1 - 0.99 (t - 0.5) / 0.4 for t <= 0.9, 0.01 below
# t = 1, then swa_lr. VGG16: lr 0.05, swa_start 200, swa_lr 0.01. At e = 170, t = 0.85:
# 1 - 0.99 * 0.35 / 0.4 = 0.13375. PreResNet-164: lr 0.1, swa_start 150, swa_lr 0.01, the same
# points scaled by 150 / 200 and taken at whole epochs; at e = 127: 1 - 0.99 * 0.34667 / 0.4 = 0.142.
SWALP_OFFICIAL_LR = {
    "cifar10_vgg16_swalp_paper.yaml": {0: 0.05, 100: 0.05, 170: 0.0066875, 185: 0.0005, 199: 0.0005,
                                       200: 0.01, 250: 0.01},
    "cifar100_preresnet164_swalp_paper.yaml": {0: 0.1, 75: 0.1, 127: 0.0142, 139: 0.001, 149: 0.001,
                                               150: 0.01, 187: 0.01},
}


@pytest.mark.parametrize("config", sorted(SWALP_OFFICIAL_LR))
def test_swalp_paper_configs_give_the_official_lr_once_per_epoch(config):
    from types import SimpleNamespace

    from swa_lib.config import load_config
    from swa_lib.methods import build_strategy
    from swa_lib.schedules import build_lr_fn, lr_position

    cfg = load_config(Path(__file__).parents[1] / "configs" / "swalp" / config)
    strategy = build_strategy(cfg)
    strategy.ctx = SimpleNamespace(lr_fn=build_lr_fn(cfg.schedule, peak_lr(cfg.optim, cfg.optim.batch_size)))
    steps = 390  # 50,000 / 128, last partial batch dropped
    for epoch, want in SWALP_OFFICIAL_LR[config].items():
        for i in (0, steps // 2, steps - 1):  # one LR for the whole epoch
            assert strategy.lr(lr_position(cfg.schedule, epoch, i, steps)) == pytest.approx(want, rel=1e-9), \
                (epoch, i)


def test_lr_update_per_step_reads_the_fractional_epoch():
    s = ScheduleConfig(epochs=10, kind="linear", lr_update="step")
    assert lr_position(s, 3, 5, 10) == 3.5
    assert lr_factor(s, lr_position(s, 3, 5, 10)) == pytest.approx(0.65)
    s.lr_update = "epoch"
    assert lr_position(s, 3, 5, 10) == 3.0
    assert lr_factor(s, lr_position(s, 3, 5, 10)) == pytest.approx(0.7)


def test_lr_update_must_be_step_or_epoch():
    from swa_lib.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="schedule.lr_update"):
        load_config(None, ["schedule.lr_update=batch"])
