"""HWA: hierarchical weight averaging (Gu et al., IEEE TNNLS 2023, arXiv 2304.11519).

Two levels of averaging over one run:

- Online: the world splits into K groups (`comm.split(K)`: contiguous blocks of ranks, one
  Horovod process set each). Each group trains one model data-parallel, gradients averaged
  inside the group only, on its own data order (seed `run.seed + g * group_seed_stride`).
  All K models start from the same weights. Every H optimizer steps (one cycle) the K
  models are replaced by their average and training goes on from there.
- Offline: at the end of each cycle the online average is copied to the CPU into a
  sliding window of the last M cycles. The output model ("hwa") is the window's mean
  with batch-norm statistics recomputed on training data.

Limits, each exact (tests/test_hwa.py): H = null with M = 1 is independent training of K
models (the output is each group's own model); K = 1 is an offline-only sliding-window
average of one data-parallel model; M = 1 is online-only averaging (local SGD), whose
output is the averaged model of the last cycle.

Every value here is a config value; the paper's K, H, M and schedules were not readable
(unverified). Each group sees the whole training set every epoch, so at equal epochs
HWA does K times the sample-gradients of plain SGD.
"""
from __future__ import annotations

import copy
import warnings
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from swa_lib.averaging.flat import load_flat_parameters_
from swa_lib.averaging.hwa import MOMENTUM_MODES, HWAAverager
from swa_lib.errors import ConfigError
from swa_lib.inprocess import InProcessConfig, build_local_workers, virtual_ranks
from swa_lib.methods.base import DataShard, EvalTarget, Strategy
from swa_lib.schedules import base_lr_fn


@dataclass
class HWAConfig(InProcessConfig):
    """Settings of HWA. Defaults are ours, not the paper's (its values are unverified).

    With fewer processes than `groups` (or `workers_in_process` set), each process holds several
    groups as in-process models, one model per group (swa_lib.inprocess)."""

    name: ClassVar[str] = "hwa"
    groups: int = 2  # K models trained in parallel; must divide the world size
    sync_period_steps: int | None = 8  # H: optimizer steps per cycle; null = never average online
    window_cycles: int = 4  # M: online averages (one per cycle) kept in the offline window
    average_buffers: bool = True  # also average BN running statistics at each online sync
    # What the optimizer's momentum does at a sync. "average" (default): momentum is averaged
    # with the weights, so the state every group continues from is the mean of the K states,
    # and H = 1 is synchronous SGD over all K groups' batches. "keep": each group keeps its
    # own (local SGD practice). "reset": zero it, as after a fresh start.
    momentum: str = "average"
    group_seed_stride: int = 1000  # group g's data-order seed is run.seed + g * stride
    # Also evaluate the last online average alone ("online", BN recomputed): what the same run
    # with window_cycles 1 (online-only averaging) would output, since the window never feeds
    # back into training. Costs one more BN recompute and evaluation per evaluation.
    eval_online: bool = False

    def validate_world(self, world_size: int) -> list[str]:
        per_process, problems = self.models_per_process(self.groups, world_size, "method.groups")
        if problems or per_process > 1:
            return problems
        if world_size % self.groups:
            return [f"method.groups: {self.groups} must divide the world size {world_size} "
                    f"(each of the K groups gets world_size / K processes)"]
        return []

    def validate(self, cfg) -> list[str]:
        p = []
        if self.groups < 1:
            p.append(f"method.groups: {self.groups} must be >= 1")
        if self.sync_period_steps is not None and self.sync_period_steps < 1:
            p.append(f"method.sync_period_steps: {self.sync_period_steps} must be >= 1, "
                     f"or null to never average online")
        if self.window_cycles < 1:
            p.append(f"method.window_cycles: {self.window_cycles} must be >= 1")
        elif self.sync_period_steps is None and self.window_cycles > 1:
            p.append(f"method.window_cycles: {self.window_cycles} needs cycles, but sync_period_steps is "
                     f"null (no cycle ever ends); use window_cycles 1 for independent training")
        if self.momentum not in MOMENTUM_MODES:
            p.append(f"method.momentum: {self.momentum!r} is not one of {', '.join(MOMENTUM_MODES)}")
        if self.group_seed_stride < 1:
            p.append(f"method.group_seed_stride: {self.group_seed_stride} must be >= 1")
        return p


class HWA(Strategy):
    """K data-parallel groups averaged every H steps; the result is the mean of the last M averages.

    The window is a deque of flat CPU vectors rather than torch's AveragedModel, which keeps
    an average over every update since its start and cannot drop the oldest one. Its mean is
    taken in float64 when the output is evaluated; memory is M copies of the parameters.
    The averaging itself is `HWAAverager`; this class ties it to the loop and the config.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        # Without cycles there is no window: the result is each group's own model.
        self.output_name = "model" if cfg.method.sync_period_steps is None else "hwa"

    def setup(self, ctx) -> None:
        super().setup(ctx)
        m, comm = self.cfg.method, ctx.comm
        self.per_process = m.models_per_process(m.groups, comm.size, "method.groups")[0]
        if self.per_process > 1:
            self.local_workers = build_local_workers(ctx.model, ctx.optimizer, self.per_process, m.workers_vectorised)
        self.averager = HWAAverager(comm, ctx.model, ctx.optimizer, groups=m.groups,
                                    sync_period_steps=m.sync_period_steps, window_cycles=m.window_cycles,
                                    average_buffers=m.average_buffers, momentum=m.momentum,
                                    workers=self.local_workers)
        self.group = self.averager.group
        self.lr_fn = self._group_lr_fn(self.group.size)
        self.average = copy.deepcopy(ctx.model)  # holds the window mean when it is evaluated
        self.online = copy.deepcopy(ctx.model) if m.eval_online else None  # the last online average
        self._check_cycles()

    @property
    def window(self) -> deque:
        return self.averager.window

    @property
    def cycles(self) -> int:
        return self.averager.cycles

    def _check_cycles(self) -> None:
        """Errors and warnings that need the world size and the dataset size."""
        m, num_train = self.cfg.method, self.ctx.workload.num_train
        if m.sync_period_steps is None or num_train is None:  # streamed ImageNet: size unknown here
            return
        steps_per_epoch = num_train // (self.cfg.optim.batch_size * self.group.size)
        total_steps = steps_per_epoch * self.cfg.schedule.epochs
        cycles = total_steps // m.sync_period_steps
        where = (f"{self.cfg.schedule.epochs} epochs x {steps_per_epoch} steps = {total_steps} steps "
                 f"with sync_period_steps {m.sync_period_steps}")
        if m.window_cycles > cycles:
            raise ConfigError([f"method.window_cycles: {m.window_cycles} is more than the {cycles} cycles "
                               f"the run will have ({where}); the window would never fill"])
        if total_steps % m.sync_period_steps and self.ctx.comm.rank == 0:
            warnings.warn(f"HWA: {where} leave the last {total_steps % m.sync_period_steps} steps out of "
                          f"the output (they end no cycle); pick a period that divides {total_steps}",
                          stacklevel=2)

    def _group_lr_fn(self, group_size: int):
        # The LR follows the batch of one model (the group's), not the world's.
        return base_lr_fn(self.cfg, group_size)

    def plan(self, world_size: int) -> None:
        self.lr_fn = self._group_lr_fn(max(world_size // self.cfg.method.groups, 1))

    def layout(self, world_size: int) -> list[str]:
        m, b = self.cfg.method, self.cfg.optim.batch_size
        sync = "never" if m.sync_period_steps is None else f"every {m.sync_period_steps} steps"
        per_process = m.models_per_process(m.groups, world_size, "method.groups")[0]
        if per_process > 1:
            return [f"{m.groups} groups of one model, {per_process} in-process models on each of {world_size} "
                    f"processes (swa_lib.inprocess), batch {b} each",
                    f"online average of the {m.groups} models {sync}; output: mean of the last "
                    f"{m.window_cycles} online averages"]
        g = world_size // m.groups
        groups = ", ".join(f"{k}: ranks {k * g}-{(k + 1) * g - 1}" if g > 1 else f"{k}: rank {k}"
                           for k in range(m.groups))
        kind = "1 group" if m.groups == 1 else f"{m.groups} groups"
        return [f"{kind} of {g} process(es), one model each, batch {g} x {b} = {g * b}; groups {groups}",
                f"online average of the {m.groups} models {sync}; output: mean of the last "
                f"{m.window_cycles} online averages"]

    def data_shard(self, epoch: int) -> DataShard:
        # HWA: shard over the group only; each group reads the whole set in its own order.
        g = self.group
        return DataShard(g.rank, g.size, self.cfg.run.seed + g.index * self.cfg.method.group_seed_stride,
                         self.cfg.optim.batch_size)

    def data_shards(self, epoch: int) -> list[DataShard]:
        if self.local_workers is None:
            return [self.data_shard(epoch)]
        seed, stride = self.cfg.run.seed, self.cfg.method.group_seed_stride  # group v = local model j
        return [DataShard(0, 1, seed + v * stride, self.cfg.optim.batch_size)
                for v in virtual_ranks(self.ctx.comm, self.per_process)]

    def gradient_group(self):
        return self.group if self.local_workers is None else None

    def eval_group(self):
        return self.group

    def lr(self, epoch: float) -> float:
        return self.lr_fn(epoch)

    def after_step(self, step: int) -> None:
        self.averager.step(step)

    def eval_targets(self):
        mean = self.averager.window_mean()
        if mean is None:
            return {}
        targets = {"hwa": (self.average, mean)}
        if self.online is not None:
            targets["online"] = (self.online, self.window[-1])
        for model, flat in targets.values():
            load_flat_parameters_(model, flat)
        # BN recomputed by the loop, exact over this group's processes, then averaged over the
        # world (as HWAAverager.combine_bn_ does): the same model everywhere.
        world = self.ctx.comm.world if self.cfg.method.groups > 1 else None
        return {name: EvalTarget(model, recompute_bn=True, bn_also_over=world) for name, (model, _) in targets.items()}

    def state_dict(self) -> dict:
        workers = None if self.local_workers is None else self.local_workers.state_dict()
        return {**self.averager.state_dict(), "workers": workers}

    def load_state_dict(self, state: dict) -> None:
        self.averager.load_state_dict(state)
        if self.local_workers is not None:
            self.local_workers.load_state_dict(state["workers"])
