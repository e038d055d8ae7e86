"""Classic SWA (Izmailov et al., UAI 2018, arXiv 1803.05407) on torch.optim.swa_utils.

An equal average of the weights at the end of every `cycle_epochs` epochs from
`swa_start_epoch` on, under a constant or cyclic SWA learning rate, followed by a
recompute of the batch-norm statistics before the average is evaluated.

With `dense_every_steps: N` the run also keeps a second equal average over the same window,
updated at the end of epoch `swa_start_epoch` and then every N optimizer steps, evaluated as
"swa_dense" (BN recomputed likewise). It trains nothing differently, so the two averages are
over the same iterates: the paired difference isolates how many snapshots are averaged. The
run's result stays the per-epoch "swa".

Timing follows the official code: with 0-based epoch e, a snapshot is taken when
e + 1 >= swa_start_epoch and (e + 1 - swa_start_epoch) % cycle_epochs == 0. From
fractional epoch `swa_start_epoch` on, the SWA learning rate takes over: in constant
mode it moves linearly from the base schedule's value to `swa_lr` over `anneal_epochs`
(as torch's SWALR does) and stays there; in cyclic mode it falls linearly from
`cycle_max_lr` to `swa_lr` within each cycle; in schedule mode the base schedule
(e.g. `swa_paper`) already reaches the SWA learning rate by itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.optim.swa_utils import AveragedModel

from swa_lib.methods.base import EvalTarget, Strategy


@dataclass
class SWAConfig:
    """Settings of classic SWA. Epoch counts are 1-based completed epochs, as in the paper."""

    name: ClassVar[str] = "swa"
    swa_start_epoch: int = 5  # first completed epoch whose weights enter the average
    swa_lr: float = 0.05  # SWA learning rate (the low end of a cycle in cyclic mode)
    lr_mode: str = "constant"  # constant | cyclic | schedule (keep the base schedule's LR)
    anneal_epochs: float = 0.0  # constant mode: linear move from the schedule's LR to swa_lr
    cycle_epochs: int = 1  # snapshot period; cyclic mode: LR cycle length
    cycle_max_lr: float | None = None  # cyclic mode: LR at the start of each cycle
    dense_every_steps: int | None = None  # also average every N steps in the same window ("swa_dense")

    def validate(self, cfg) -> list[str]:
        p = []
        if not 1 <= self.swa_start_epoch <= cfg.schedule.epochs:
            p.append(f"method.swa_start_epoch: {self.swa_start_epoch} must be in [1, schedule.epochs="
                     f"{cfg.schedule.epochs}] so at least one snapshot is averaged")
        if self.swa_lr <= 0:
            p.append(f"method.swa_lr: {self.swa_lr} must be > 0")
        if self.lr_mode not in ("constant", "cyclic", "schedule"):
            p.append(f"method.lr_mode: {self.lr_mode!r} is not one of constant, cyclic, schedule")
        if self.anneal_epochs < 0:
            p.append(f"method.anneal_epochs: {self.anneal_epochs} must be >= 0")
        if self.cycle_epochs < 1:
            p.append(f"method.cycle_epochs: {self.cycle_epochs} must be >= 1")
        if self.lr_mode == "cyclic" and (self.cycle_max_lr is None or self.cycle_max_lr < self.swa_lr):
            p.append(f"method.cycle_max_lr: {self.cycle_max_lr} must be set and >= swa_lr in cyclic mode")
        if self.dense_every_steps is not None and self.dense_every_steps < 1:
            p.append(f"method.dense_every_steps: {self.dense_every_steps} must be >= 1 (or unset)")
        return p


class SWA(Strategy):
    """Stochastic weight averaging: the result is the running equal average ("swa")."""

    output_name = "swa"

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # Parameters are averaged; BN buffers are recomputed for the average before each
        # evaluation, which is the paper's procedure (use_buffers=False).
        self.average = AveragedModel(ctx.model, use_buffers=False)
        self.dense = (AveragedModel(ctx.model, use_buffers=False)
                      if self.cfg.method.dense_every_steps else None)

    @property
    def phase(self) -> str:
        return "swa" if self.average.n_averaged.item() > 0 else "sgd"

    def lr(self, epoch: float) -> float:
        m = self.cfg.method
        start = m.swa_start_epoch
        if m.lr_mode == "schedule" or epoch < start:
            return self.ctx.lr_fn(epoch)
        if m.lr_mode == "cyclic":
            t = ((epoch - start) % m.cycle_epochs) / m.cycle_epochs
            return (1 - t) * m.cycle_max_lr + t * m.swa_lr
        if m.anneal_epochs > 0 and epoch < start + m.anneal_epochs:
            t = (epoch - start) / m.anneal_epochs
            return (1 - t) * self.ctx.lr_fn(start) + t * m.swa_lr
        return m.swa_lr

    def planned_phase(self, epoch: int) -> str:
        return "swa" if epoch >= self.cfg.method.swa_start_epoch else "sgd"  # the LR takeover, too

    def after_step(self, step: int) -> None:
        # The dense average starts with the epoch-end snapshot of swa_start_epoch (after_epoch),
        # so a step that ends an epoch is taken once.
        if self.dense is not None and self.dense.n_averaged.item() > 0 \
                and step % self.cfg.method.dense_every_steps == 0:
            self.dense.update_parameters(self.ctx.model)

    def after_epoch(self, epoch: int, train_metrics: dict) -> None:
        m = self.cfg.method
        completed = epoch + 1
        if completed >= m.swa_start_epoch and (completed - m.swa_start_epoch) % m.cycle_epochs == 0:
            self.average.update_parameters(self.ctx.model)
        if self.dense is not None and completed == m.swa_start_epoch:
            self.dense.update_parameters(self.ctx.model)

    def eval_targets(self):
        targets = {}
        if self.average.n_averaged.item() > 0:
            targets["swa"] = EvalTarget(self.average.module, recompute_bn=True)
        if self.dense is not None and self.dense.n_averaged.item() > 0:
            targets["swa_dense"] = EvalTarget(self.dense.module, recompute_bn=True)
        return targets

    def final_metrics(self) -> dict[str, float]:
        if self.dense is None:
            return {}
        return {"swa/snapshots": float(self.average.n_averaged.item()),
                "swa_dense/snapshots": float(self.dense.n_averaged.item())}

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(),
                **({"dense": self.dense.state_dict()} if self.dense is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state["average"])
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
