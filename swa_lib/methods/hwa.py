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

import torch

from swa_lib.averaging import bn_buffers, update_bn_
from swa_lib.errors import ConfigError
from swa_lib.methods.base import DataShard, EvalTarget, Strategy
from swa_lib.schedules import base_lr_fn

MOMENTUM_MODES = ("average", "keep", "reset")


@dataclass
class HWAConfig:
    """Settings of HWA. Defaults are ours, not the paper's (its values are unverified)."""

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


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All parameters as one float32 CPU vector (a snapshot of the weights)."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()])


def load_flat_parameters_(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a `flat_parameters` vector back into `model` (any device and memory format)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()


class HWAAverager:
    """HWA's two levels of averaging for any training loop (the `hwa` strategy runs on it too).

    Under mpirun with 4 processes, K = 2 groups of 2, one online average every 8 steps and a
    window of the last 4 of them:

        comm = init_comm()
        hwa = HWAAverager(comm, model, optimizer, groups=2, sync_period_steps=8, window_cycles=4)
        for step, (x, y) in enumerate(my_batches(shard=hwa.group.rank, of=hwa.group.size,
                                                 seed=seed + hwa.group.index), start=1):
            loss_fn(model(x), y).backward()
            allreduce_gradients_(comm, model, hwa.group)  # data-parallel inside the group only
            optimizer.step(); optimizer.zero_grad()
            hwa.step(step)                                # every 8 steps: the K models' average
        hwa.output_(eval_model, my_batches(...))          # window mean, BN recomputed over the world

    All K models must start from the same weights (broadcast them once). Every process
    calls `step` with the same step count, since each sync is a world-wide allreduce.
    """

    def __init__(self, comm, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 groups: int, sync_period_steps: int | None, window_cycles: int,
                 average_buffers: bool = True, momentum: str = "average"):
        if sync_period_steps is not None and sync_period_steps < 1:
            raise ValueError(f"sync_period_steps: {sync_period_steps} must be >= 1, or None to never average")
        if window_cycles < 1:
            raise ValueError(f"window_cycles: {window_cycles} must be >= 1")
        if momentum not in MOMENTUM_MODES:
            raise ValueError(f"momentum: {momentum!r} is not one of {', '.join(MOMENTUM_MODES)}")
        if momentum != "keep" and optimizer is None and groups > 1:
            raise ValueError(f"momentum={momentum!r} acts on the optimizer's momentum: pass the optimizer")
        self.comm, self.model, self.optimizer = comm, model, optimizer
        self.groups, self.sync_period_steps = groups, sync_period_steps
        self.average_buffers, self.momentum = average_buffers, momentum
        self.group = comm.split(groups)  # Distributed: every rank creates all K groups, in order
        self.window: deque[torch.Tensor] = deque(maxlen=window_cycles)
        self.cycles = 0  # online averages taken so far (= step // H)

    def step(self, step: int) -> bool:
        """Call after optimizer step number `step` (1-based); at the end of a cycle, average the
        K models (online) and add the average to the window (offline). True if a cycle ended."""
        if self.sync_period_steps is None or step % self.sync_period_steps:
            return False
        if self.groups > 1:
            self.average_groups_()
        self.cycles += 1
        self.window.append(flat_parameters(self.model))  # HWA offline: the end of this cycle
        return True

    def average_groups_(self) -> None:
        """Replace every group's model (and momentum, per `momentum`) by the mean over the K groups.

        One coalesced allreduce over the world: members of a group hold identical tensors, so
        the mean over all ranks is the mean over the K groups (up to float rounding, and the
        result is bitwise the same on every rank)."""
        tensors = [p.detach() for p in self.model.parameters()]
        if self.average_buffers:
            tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        momenta = [] if self.optimizer is None else \
            [self.optimizer.state[p].get("momentum_buffer") for p in self.model.parameters()]
        momenta = [b for b in momenta if b is not None]
        if self.momentum == "average":
            tensors += momenta
        self.comm.allreduce_(tensors, "mean", self.comm.world)  # Distributed: HWA online average
        if self.momentum == "reset":
            for b in momenta:
                b.zero_()

    def window_mean(self) -> torch.Tensor | None:
        """The mean of the window's online averages (float64 sum, float32 result); None while empty."""
        if not self.window:
            return None
        total = torch.zeros_like(self.window[0], dtype=torch.float64)
        for snapshot in self.window:
            total += snapshot
        return (total / len(self.window)).float()

    def combine_bn_(self, model: torch.nn.Module) -> None:
        """After a BN recompute inside each group: the mean over the world, so every group ends
        with the same statistics (groups saw different batches, each rank an equal share)."""
        if self.groups > 1:
            self.comm.allreduce_(bn_buffers(model), "mean", self.comm.world)  # Distributed

    def output_(self, model: torch.nn.Module, bn_batches, *, max_batches: int | None = None,
                device: torch.device | None = None) -> bool:
        """Load HWA's output into `model`: the window mean with BN statistics recomputed from
        `bn_batches` (this process's shard of training batches; the same count on every rank)
        and combined exactly over the world. False (model untouched) while the window is empty."""
        flat = self.window_mean()
        if flat is None:
            return False
        load_flat_parameters_(model, flat)
        update_bn_(model, bn_batches, comm=self.comm, group=self.group, max_batches=max_batches, device=device)
        self.combine_bn_(model)
        return True

    def state_dict(self) -> dict:
        return {"cycles": self.cycles, "window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        self.cycles = state["cycles"]
        self.window = deque((t.cpu() for t in state["window"]), maxlen=self.window.maxlen)


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
        self.averager = HWAAverager(comm, ctx.model, ctx.optimizer, groups=m.groups,
                                    sync_period_steps=m.sync_period_steps, window_cycles=m.window_cycles,
                                    average_buffers=m.average_buffers, momentum=m.momentum)
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
        self.lr_fn = self._group_lr_fn(world_size // self.cfg.method.groups)

    def layout(self, world_size: int) -> list[str]:
        m, b = self.cfg.method, self.cfg.optim.batch_size
        g = world_size // m.groups
        groups = ", ".join(f"{k}: ranks {k * g}-{(k + 1) * g - 1}" if g > 1 else f"{k}: rank {k}"
                           for k in range(m.groups))
        sync = "never" if m.sync_period_steps is None else f"every {m.sync_period_steps} steps"
        return [f"{m.groups} groups of {g} process(es), one model each, batch {g} x {b} = {g * b}; groups {groups}",
                f"online average of the {m.groups} models {sync}; output: mean of the last "
                f"{m.window_cycles} online averages"]

    def data_shard(self, epoch: int) -> DataShard:
        # HWA: shard over the group only; each group reads the whole set in its own order.
        g = self.group
        return DataShard(g.rank, g.size, self.cfg.run.seed + g.index * self.cfg.method.group_seed_stride,
                         self.cfg.optim.batch_size)

    def gradient_group(self):
        return self.group

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
        return self.averager.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averager.load_state_dict(state)
