"""K models in one process as K "virtual ranks": SWAP and HWA without one process per model.

SWAP's phase-2 workers and HWA's groups each need a model of their own. With
`method.workers_in_process: K_local` (or automatically when fewer processes are launched
than the method has workers/groups), every process holds K_local models (swa_lib.stacked) and
the run behaves as if V = world_size x K_local processes had been launched, one model each:
virtual rank v = rank x K_local + j is local model j of process `rank`. Each virtual rank
keeps the data shard, seed, batch and LR schedule it would have had as a process of its own:

  data-parallel (SWAP phase 1)  the V models are replicas: model v trains on shard v of V,
                                their gradients are averaged over all V (here, then over the
                                processes) and every replica takes the same step. BN running
                                statistics stay per replica, as they do per process.
  independent (SWAP phase 2, HWA) model v is worker / group v alone: its own seed, the
                                whole training set, no gradient exchange.

The strategy says which by its `gradient_group()`: the world (data-parallel) or None
(independent). Only groups of one virtual rank are supported in-process (a worker or group
is one model), which is what `resolve_models_per_process` enforces.

Oracle (tests/test_inprocess.py): a run with K_local models in one process gives the same
per-worker weights and the same average as K processes with the same seeds; bitwise on the
sequential path for K = 2 (the sum of two gradients or weights is the same in either order);
the vectorised path equals the sequential one to 1e-9 when both run in float64. In float32 the
vectorised path sums in another order: the training is chaotic, and a 1-ulp change can flip a
ReLU input or max-pool window that sits near a tie and reroute a gradient element, on some CPUs
within a few steps (the test's docstring has the measurements). Neither path is more correct:
both match float64 gradients except at such ties. `workers_vectorised` defaults to false, the
path whose runs are bitwise those of K processes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swa_lib.averaging.workers import mean_over_workers_
from swa_lib.stacked import InProcessWorkers, build_workers, stacked_batches


@dataclass
class InProcessConfig:
    """The config fields of a method whose K models may share a process (SWAP's and HWA's configs)."""

    # Models per process; null: K / world_size when fewer processes than K are launched, else 1.
    workers_in_process: int | None = None
    # true: the models as one vmapped model (equal to K processes up to rounding, which a long run
    # amplifies; see tests/test_inprocess.py); false (default): a loop over K copies, bitwise equal to K processes.
    workers_vectorised: bool = False

    def models_per_process(self, models: int, world_size: int, key: str) -> tuple[int, list[str]]:
        return resolve_models_per_process(models, world_size, self.workers_in_process, key)


def resolve_models_per_process(models: int, world_size: int, explicit: int | None, key: str) -> tuple[int, list[str]]:
    """How many models each process holds, and what is wrong with the request.

    Args:
        models: the method's K (SWAP's workers, HWA's groups).
        explicit: `method.workers_in_process`; None chooses: K / world_size models per process
            when fewer processes than K are launched, else 1 (one model per group of processes).
        key: the config key of K, for messages.
    """
    if explicit is None:
        if world_size >= models:
            return 1, []
        if models % world_size:  # the method's own check names it
            return 1, []
        return models // world_size, []
    if explicit < 1:
        return 1, [f"method.workers_in_process: {explicit} must be >= 1, or null to choose it from the world size"]
    if explicit > 1 and world_size * explicit != models:
        return 1, [f"method.workers_in_process: {explicit} models on each of {world_size} processes make "
                   f"{world_size * explicit} models, but {key} is {models}; in-process workers are one model "
                   f"each, so world size x workers_in_process must equal {models}"]
    return explicit, []


def build_local_workers(model: torch.nn.Module, optimizer: torch.optim.Optimizer, count: int,
                        vectorised: bool) -> InProcessWorkers:
    """`count` copies of `model`, each with an optimizer of the same type and settings as `optimizer`."""
    kind, defaults = type(optimizer), dict(optimizer.defaults)
    return build_workers([model] * count, lambda params: kind(params, **defaults), vectorised=vectorised)


def virtual_ranks(comm, count: int) -> list[int]:
    """The virtual ranks of this process's `count` local models."""
    return [comm.rank * count + j for j in range(count)]


class StackedLoader:
    """K training loaders read in step: (x [K, B, ...], y [K, B]) per step, like one loader."""

    def __init__(self, loaders: Sequence):
        self.loaders = list(loaders)

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def __len__(self) -> int:
        return min(len(loader) for loader in self.loaders)

    def __iter__(self):
        return stacked_batches(self.loaders)


def train_step_(workers: InProcessWorkers, x, y, loss_fn, *, comm, group, autocast=None):
    """One step of every local model; with `group`, first average the gradients over all replicas
    (the local models, then the processes of `group`). Returns (losses [K], outputs [K, B, C])."""
    losses, out = workers.forward_backward(x, y, loss_fn, autocast)
    if group is not None:
        mean_over_workers_(workers, "grads", comm if group.size > 1 else None, group)
    workers.step()
    return losses, out


def mirror_(workers: InProcessWorkers, model: torch.nn.Module) -> None:
    """Load local model 0 into `model` (the loop's ctx.model: what it checkpoints, saves and
    evaluates as "model", so that rank 0's "model" is worker 0 as with one model per process)."""
    model.load_state_dict(workers.model_state_dict(0))


def independent_workers(strategy) -> bool:
    """Whether this process trains several models that are workers of their own (no gradient exchange)."""
    return strategy.local_workers is not None and strategy.gradient_group() is None


def gather_per_worker(comm, strategy, per_model: list) -> dict:
    """{worker index: value} over the world, one entry per model trained on its own (SWAP phase 2,
    HWA), from each group's first process or each in-process model; {} when one model spans the
    world or the groups are isolated. `per_model`: this process's values, one per local model."""
    group = strategy.eval_group()
    independent = independent_workers(strategy)
    if strategy.isolated or not (independent or group.size < comm.size):
        return {}
    if independent:
        entries = list(zip(virtual_ranks(comm, len(per_model)), per_model, strict=True))
    else:
        entries = [(group.index, per_model[0])] if group.rank == 0 else []
    return {k: v for part in comm.allgather_object(entries) for k, v in part}  # Distributed
