"""Learning-rate schedules against values computed by hand."""
import math

import pytest

from swa_lib.config import OptimConfig, ScheduleConfig
from swa_lib.schedules import lr_factor, peak_lr


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
