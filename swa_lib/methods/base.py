"""The hook contract between the training loop and a method, with plain synchronous SGD as the default.

The loop (swa_lib.loop) is written once. A method changes its behaviour only through the
hooks of `Strategy`, in the spirit of AlgoPerf's `spec.py`: each hook below says when the
loop calls it, what it may read and what it may change. "Reads ctx" means the TrainContext
(swa_lib.loop): the config, communicator, model, optimizer, device, workload, logger, run
directory, timer, and the completed epoch and step. No hook may assign to a field of ctx:
the loop owns them, and only the loop advances ctx.epoch and ctx.step.

  Building (before ctx exists; in this order)
    prepare_model(model, device)  may change `model` in place without adding parameters
                                  (SWALP inserts its activation/error quantizers); nothing else.
    build_optimizer(model, device) returns the training optimizer over model.parameters();
                                  may keep what it builds (SWALP's rounding generator).
    setup(ctx)                    once, after model, optimizer and communicator exist: create
                                  groups, averages, copies. May change only the strategy.
  Training (read ctx; change only the strategy, except where said)
    data_shard(epoch)             which shard, seed and batch size this process trains on.
    data_shards(epoch)            the same, one per model, when the strategy trains `local_workers`
                                  (K models in this process, swa_lib.inprocess) instead of ctx.model.
    gradient_group()              the group gradients are averaged over (None: no sync). With
                                  local_workers: the world (the K models are replicas; gradients
                                  are averaged over them too) or None (each model is a worker).
    eval_group()                  the processes that hold the same training model.
    lr(epoch)                     the LR at a fractional epoch; pure: no state may change.
    after_step(step)              after every optimizer step. May write the training model's
                                  weights, buffers and optimizer state (HWA's online average,
                                  an allreduce of BN statistics), nothing else of ctx.
    after_epoch(epoch, metrics)   after every epoch, with its train metrics over the gradient
                                  group. May change the phase and the averages (SWA, SWAP phase 3);
                                  may write the training model only as after_step may.
    finished()                    True ends the run before the epoch budget (SWAP after phase 3).
    partial_result()              a message once the run ended with a result computed by part of
                                  the world (SWAP's survivors); the loop returns it at once,
                                  without world-wide work. None otherwise.
    isolated                      True while groups must not wait on each other (see below).
  Evaluation
    eval_targets()                the extra models to evaluate, {name: EvalTarget}; must not
                                  change ctx. A target whose BN statistics must be recomputed
                                  says so (EvalTarget.recompute_bn) and the loop does it, over
                                  the data and group it names.
    output_name                   which evaluated model is the method's result.
    phase                         a short name for the current phase (logged, in checkpoints).
  Checkpoints
    state_dict() / load_state_dict(state)  everything the strategy needs to resume exactly;
                                  load_state_dict runs after setup.
  --dry-run (no data, model or processes)
    plan(world_size)              prepares `lr` with the functions `setup` uses.
    planned_phase(epoch)          the phase 0-based `epoch` trains in, as planned.
    layout(world_size)            how the processes are organised, in words.

World-size checks are not hooks: a method's config may define `validate_world(world_size)`,
and swa_lib.config.validate_world is the one place that calls it (the entry point, the
loop and --dry-run --world-size N all go through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from swa_lib.schedules import base_lr_fn


@dataclass(frozen=True)
class DataShard:
    """What this process trains on: shard `rank` of `count`, data order from `seed`."""

    rank: int
    count: int
    seed: int
    batch_size: int


@dataclass
class EvalTarget:
    """A model for the loop to evaluate, and what the loop does to it first.

    Args:
        model: the model; the loop evaluates it in fp32 and does not keep it.
        recompute_bn: recompute its BN running statistics first, on this process's shard of
            the last epoch's training data (`data_shard`), combined exactly over `eval_group()`
            (swa_lib.averaging.recompute_bn_).
        bn_also_over: then also take the mean of those statistics over this group, when it
            is larger than the eval group (HWA: over the world, so every group's copy of the
            output ends the same).
        isolate_rng: recompute under a forked RNG, so the model's forward passes (dropout,
            rounding noise) draw nothing from the run's streams (SWALP's low-precision copies).
    """

    model: nn.Module
    recompute_bn: bool = False
    bn_also_over: object = None
    isolate_rng: bool = False


@dataclass
class SGDConfig:
    """Plain synchronous data-parallel SGD: the baseline every method is compared to."""

    name: ClassVar[str] = "sgd"

    def validate(self, cfg) -> list[str]:
        return []


class Strategy:
    """Synchronous data-parallel SGD over the whole world. Subclass to make a method."""

    output_name = "model"  # the training model itself is the result
    # K models this process trains instead of ctx.model (swa_lib.inprocess; SWAP and HWA with
    # method.workers_in_process), built in setup; None: the loop trains ctx.model.
    local_workers = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.ctx = None

    @property
    def phase(self) -> str:
        """A short name for the current phase (logged, and stored in checkpoints)."""
        return "train"

    # ------------------------------------------------------------------ building
    def prepare_model(self, model: nn.Module, device: torch.device) -> None:
        """Change the freshly built model in place before the optimizer exists (no new parameters)."""

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        """The training optimizer: SGD with the config's momentum, Nesterov and weight decay."""
        o = self.cfg.optim
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)

    def setup(self, ctx) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------------ training
    def data_shard(self, epoch: int) -> DataShard:
        comm = self.ctx.comm
        return DataShard(comm.rank, comm.size, self.cfg.run.seed, self.cfg.optim.batch_size)

    def data_shards(self, epoch: int) -> list[DataShard]:
        """One DataShard per model this process trains: [data_shard(epoch)] unless local_workers is set."""
        return [self.data_shard(epoch)]

    def gradient_group(self):
        return self.ctx.comm.world

    def eval_group(self):
        """Processes that hold the same training model and evaluate it together."""
        return self.gradient_group() or self.ctx.comm.world

    def lr(self, epoch: float) -> float:
        return self.ctx.lr_fn(epoch)

    def after_step(self, step: int) -> None:
        pass

    def after_epoch(self, epoch: int, train_metrics: dict) -> None:
        pass

    def finished(self) -> bool:
        return False

    def partial_result(self) -> str | None:
        return None

    @property
    def isolated(self) -> bool:
        """True while groups must not wait on each other (SWAP phase 2 that tolerates a dead worker).

        The loop then skips everything that spans the world: per-worker result gathering and
        periodic checkpoints (phase boundaries and the end still checkpoint)."""
        return False

    # ------------------------------------------------------------------ evaluation
    def eval_targets(self) -> dict[str, EvalTarget]:
        return {}

    def final_metrics(self) -> dict[str, float]:
        """Numbers about how the method ran (not model results) for summary.json's "final"."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ --dry-run
    def plan(self, world_size: int) -> None:
        """Make `lr` answer without data, model or processes (--dry-run), built by the same
        functions as in `setup`, so the printed schedule is the one the loop will run."""
        self.ctx = SimpleNamespace(lr_fn=base_lr_fn(self.cfg, world_size))

    def planned_phase(self, epoch: int) -> str:
        """The phase 0-based `epoch` trains in, as planned (a phase ended by a metric ends at its cap)."""
        return self.phase

    def layout(self, world_size: int) -> list[str]:
        """How `world_size` processes are organised, one line each (for --dry-run)."""
        return [f"one model, data-parallel over all {world_size} processes: global batch "
                f"{world_size} x {self.cfg.optim.batch_size} = {world_size * self.cfg.optim.batch_size}"]
