"""Learning-rate schedules as pure functions of the epoch (fractional: step / steps_per_epoch).

A pure function of position, not a stateful scheduler object, so that a resumed run
gets bit-identical learning rates and a strategy (SWA, SWAP phase 2) can take over the
LR from some point on by wrapping the function.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from swa_lib.errors import ConfigError
from swa_lib.sections import OptimConfig, ScheduleConfig

LrFn = Callable[[float], float]  # fractional epoch -> learning rate


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """Peak LR, scaled linearly with the global batch if a reference batch is given.

    Linear scaling (Goyal et al. 2017) is what SWAP's large-batch phase uses: doubling
    the batch doubles the LR.
    """
    if optim.lr_reference_batch is None:
        return optim.lr
    return optim.lr * global_batch / optim.lr_reference_batch


def lr_factor(schedule: ScheduleConfig, epoch: float) -> float:
    """The multiplier on the peak LR at fractional `epoch` (0 <= epoch <= schedule.epochs)."""
    total = schedule.epochs
    warm = schedule.warmup_epochs
    if warm > 0 and epoch < warm:
        return epoch / warm
    final = schedule.final_lr_fraction
    progress = (epoch - warm) / max(total - warm, 1e-12)
    progress = min(max(progress, 0.0), 1.0)
    kind = schedule.kind
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - (1.0 - final) * progress
    if kind == "step":
        passed = sum(1 for m in schedule.milestones_epochs if epoch >= m)
        return schedule.gamma ** passed
    if kind == "swa_paper":
        # Izmailov et al. (SWA) and Yang et al. (SWALP) official scripts.
        t = epoch / (schedule.reference_epochs or total)
        if t <= 0.5:
            return 1.0
        if t <= 0.9:
            return 1.0 - (1.0 - final) * (t - 0.5) / 0.4
        return final
    raise ValueError(f"schedule.kind: unknown schedule {kind!r}")


def lr_position(schedule: ScheduleConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The (fractional) epoch at which the LR of this step is read, per `schedule.lr_update`.

    "step": epoch + step_in_epoch / steps_per_epoch, a new LR before every step; "epoch": the
    integer epoch, one LR for the whole epoch (the official SWA / SWALP scripts).
    """
    if schedule.lr_update == "epoch":
        return float(epoch)
    return epoch + step_in_epoch / steps_per_epoch


def build_lr_fn(schedule: ScheduleConfig, peak: float) -> LrFn:
    """LR as a function of fractional epoch."""
    return lambda epoch: peak * lr_factor(schedule, epoch)


def base_lr_fn(cfg, processes: int) -> LrFn:
    """The config's own schedule for `processes` data-parallel processes (batch optim.batch_size each).

    What the loop gives every strategy (ctx.lr_fn), and what --dry-run prints from: one source."""
    return build_lr_fn(cfg.schedule, peak_lr(cfg.optim, cfg.optim.batch_size * processes))


def check_eval_cadence(cfg, steps_per_epoch: int) -> None:
    """eval.every_steps above one epoch must be a whole number of the loader's real epochs.

    The training loader drops the last partial batch (CIFAR-10 at batch 128: 390 steps, not 391),
    so a cadence computed by hand can miss; it then drifts off the epoch boundaries it was meant
    to hit. Shorter cadences are a step grid (time to target) and may cut epochs anywhere."""
    every = cfg.eval.every_steps
    if every and every > steps_per_epoch and every % steps_per_epoch:
        k = max(round(every / steps_per_epoch), 1)
        raise ConfigError([f"eval.every_steps: {every} is more than one epoch but not a whole number of epochs: "
                           f"an epoch here is {steps_per_epoch} steps (the loader drops the last partial batch), "
                           f"so evaluations would drift off epoch boundaries; use {k * steps_per_epoch} ({k} "
                           f"epochs) or eval.every_epochs"])
