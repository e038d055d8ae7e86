"""The hooks the training loop calls, with plain synchronous SGD as the default.

The loop (swa_lib.loop) is written once. A method changes its behaviour only through
these hooks, in the spirit of AlgoPerf's `update_params` / `prepare_for_eval`:

  setup(ctx)              once, after the model, optimizer and communicator exist
  data_shard(epoch)       which shard, seed and batch size this process trains on
  gradient_group()        the process group gradients are averaged over (None: no sync)
  lr(epoch)               the learning rate at a fractional epoch
  after_step(step)        after every optimizer step (EMA, LAWA, HWA sync)
  after_epoch(epoch, m)   after every epoch with the epoch's train metrics (SWA, SWAP)
  eval_targets()          extra models to evaluate, e.g. the running average
  output_name             which evaluated model is the method's result
  finished()              stop the run before the epoch budget (rarely needed)
  state_dict()/load_state_dict()   everything needed to resume exactly

and, for --dry-run (no data, model or processes): plan(world_size) prepares `lr`;
planned_phase(epoch) and layout(world_size) describe the run in words.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

from torch import nn

from swa_lib.schedules import base_lr_fn


class PartialWorldResult(Exception):
    """A run that lost processes ended with a result computed by the survivors (SWAP phase 3).

    The message says what was computed and where it was written; the entry point exits 0 on
    the surviving processes without the world-wide shutdown that would wait on the dead."""


@dataclass(frozen=True)
class DataShard:
    """What this process trains on: shard `rank` of `count`, data order from `seed`."""

    rank: int
    count: int
    seed: int
    batch_size: int


@dataclass
class SGDConfig:
    """Plain synchronous data-parallel SGD: the baseline every method is compared to."""

    name: ClassVar[str] = "sgd"

    def validate(self, cfg) -> list[str]:
        return []


class Strategy:
    """Synchronous data-parallel SGD over the whole world. Subclass to make a method."""

    output_name = "model"  # the training model itself is the result

    def __init__(self, cfg):
        self.cfg = cfg
        self.ctx = None

    @property
    def phase(self) -> str:
        """A short name for the current phase (logged, and stored in checkpoints)."""
        return "train"

    def setup(self, ctx) -> None:
        self.ctx = ctx

    def data_shard(self, epoch: int) -> DataShard:
        comm = self.ctx.comm
        return DataShard(comm.rank, comm.size, self.cfg.run.seed, self.cfg.optim.batch_size)

    def gradient_group(self):
        return self.ctx.comm.world

    def eval_group(self):
        """Processes that hold the same training model and evaluate it together."""
        return self.gradient_group() or self.ctx.comm.world

    def lr(self, epoch: float) -> float:
        return self.ctx.lr_fn(epoch)

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

    def after_step(self, step: int) -> None:
        pass

    def after_epoch(self, epoch: int, train_metrics: dict) -> None:
        pass

    def eval_targets(self) -> dict[str, nn.Module]:
        return {}

    def finished(self) -> bool:
        return False

    @property
    def isolated(self) -> bool:
        """True while groups must not wait on each other (SWAP phase 2 that tolerates a dead worker).

        The loop then skips everything that spans the world: per-worker result gathering and
        periodic checkpoints (phase boundaries and the end still checkpoint)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
