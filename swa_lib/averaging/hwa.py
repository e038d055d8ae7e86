"""HWA's two levels of averaging for any training loop: K groups averaged every H steps (online),
and the mean of the last M online averages (offline window). The `hwa` strategy
(swa_lib.methods.hwa) ties it to the loop and the config.
"""
from __future__ import annotations

from collections import deque

import torch

from swa_lib.averaging.bn import bn_buffers, update_bn_
from swa_lib.averaging.flat import flat_parameters, load_flat_parameters_
from swa_lib.averaging.workers import mean_over_workers_

MOMENTUM_MODES = ("average", "keep", "reset")


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

    `workers` (swa_lib.stacked.InProcessWorkers): the K groups are one model each, held by the
    processes as in-process models (swa_lib.inprocess); `model` and `optimizer` are then unused
    by the averaging and every process is a group of its own.
    """

    def __init__(self, comm, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 groups: int, sync_period_steps: int | None, window_cycles: int,
                 average_buffers: bool = True, momentum: str = "average", workers=None):
        if sync_period_steps is not None and sync_period_steps < 1:
            raise ValueError(f"sync_period_steps: {sync_period_steps} must be >= 1, or None to never average")
        if window_cycles < 1:
            raise ValueError(f"window_cycles: {window_cycles} must be >= 1")
        if momentum not in MOMENTUM_MODES:
            raise ValueError(f"momentum: {momentum!r} is not one of {', '.join(MOMENTUM_MODES)}")
        if momentum != "keep" and optimizer is None and groups > 1:
            raise ValueError(f"momentum={momentum!r} acts on the optimizer's momentum: pass the optimizer")
        self.comm, self.model, self.optimizer, self.workers = comm, model, optimizer, workers
        self.groups, self.sync_period_steps = groups, sync_period_steps
        self.average_buffers, self.momentum = average_buffers, momentum
        # Distributed: every rank creates all the groups, in order.
        self.group = comm.split(groups if workers is None else comm.size)
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
        self.window.append(self._flat())  # HWA offline: the end of this cycle
        return True

    def _flat(self) -> torch.Tensor:
        if self.workers is None:
            return flat_parameters(self.model)
        # After a sync every model holds the average: local model 0's parameters, as flat_parameters.
        return torch.cat([slot[0].reshape(-1).to("cpu", torch.float32) for slot in self.workers.slots("params")])

    def average_groups_(self) -> None:
        """Replace every group's model (and momentum, per `momentum`) by the mean over the K groups.

        One coalesced allreduce over the world: members of a group hold identical tensors, so
        the mean over all ranks is the mean over the K groups (up to float rounding, and the
        result is bitwise the same on every rank)."""
        if self.workers is not None:
            self._average_workers_()
            return
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

    def _average_workers_(self) -> None:
        """`average_groups_` over in-process models: their mean here, then over the processes."""
        kinds = ["params"] + ["float_buffers"] * self.average_buffers + ["momentum"] * (self.momentum == "average")
        comm = self.comm if self.comm.size > 1 else None
        for kind in kinds:
            mean_over_workers_(self.workers, kind, comm, self.comm.world)  # Distributed
        if self.momentum == "reset":
            for slot in self.workers.slots("momentum"):
                for b in slot:
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
