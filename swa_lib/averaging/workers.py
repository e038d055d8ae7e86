"""Averages over K in-process models (swa_lib.stacked), composed with averages over processes.

`mean_over_workers_` is what a loop needs while it trains in-process workers: the mean of one
kind of tensor (weights, gradients, BN statistics, momentum) over this process's K models and
then over a process group, written back into every model. The state-dict functions below are
the same mean on ordinary single-model state dicts, for models that differ in count per process.

A process holding K_p models (swa_lib.stacked) contributes their mean with weight K_p, so the
world result is the plain mean over all models even when processes hold different K:

    mean over all models = sum_p K_p * mean_p / sum_p K_p

`combine_averages` is that formula on values in hand (pure, what the tests check);
`allreduce_average_` is the same over a communicator: one allreduce-sum of K_p * mean_p and K_p.

What is averaged: floating-point parameters and buffers (BN running mean and variance). Integer
buffers (BN's num_batches_tracked) are not averageable; they are taken from the first state.
After averaging weights the averaged BN statistics do not match the averaged weights: SWAP and
HWA recompute them (swa_lib.averaging.update_bn_) on a plain module loaded with the average.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from swa_lib.stacked import InProcessWorkers

State = dict[str, torch.Tensor]


def average_state_dicts(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """Weighted mean of ordinary state dicts (float tensors; others from `states[0]`), accumulated in
    float64 and returned in each tensor's own dtype. Weights default to equal."""
    if not states:
        raise ValueError("average_state_dicts needs at least one state dict")
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per state with a positive sum, got {weights}")
    total = sum(weights)
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for w, state in zip(weights, states):
            acc += w * state[name].to(torch.float64)
        out[name] = (acc / total).to(first.dtype)
    return out


def average_workers(workers: InProcessWorkers) -> State:
    """The mean of this process's K models as one ordinary state dict."""
    return average_state_dicts([workers.model_state_dict(k) for k in range(workers.num_workers)])


def combine_averages(averages: Sequence[State], counts: Sequence[int]) -> State:
    """The mean over all models from per-process means: process p's mean weighs its model count K_p."""
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(f"model counts must be positive ints, got {list(counts)}")
    return average_state_dicts(averages, weights=counts)


def allreduce_average_(comm, average: State, count: int, group=None) -> State:
    """`combine_averages` over `group` (default the world) in place: this process's mean of `count`
    models becomes the mean over every model of the group. Every member calls it with the same keys.

    Float tensors travel in their own dtype (one allreduce-sum per dtype, through
    swa_lib.comm.Communicator.allreduce_) with the count beside them in float64 (exact)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    floats = [t for t in average.values() if t.is_floating_point()]
    total = torch.tensor([float(count)], dtype=torch.float64, device=floats[0].device if floats else None)
    with torch.no_grad():
        for t in floats:
            t.mul_(count)
        # Distributed: sum of K_p * mean_p and of K_p over the group.
        comm.allreduce_(floats + [total], op="sum", group=group)
        for t in floats:
            t.div_(total.item())
    return average


def _means(workers: InProcessWorkers, kind: str, comm, group) -> tuple[list, list[torch.Tensor]]:
    """(slots, the mean of each slot over the local models and then over `group`'s processes)."""
    slots = workers.slots(kind)
    # Summed in model order, then divided: for K = 2 bitwise an allreduce-mean over two processes.
    means = [torch.stack(slot).sum(0).div_(len(slot)) for slot in slots]
    if comm is not None and means:
        comm.allreduce_(means, op="mean", group=group)  # Distributed: the mean over the group's models
    return slots, means


@torch.no_grad()
def mean_over_workers_(workers: InProcessWorkers, kind: str, comm=None, group=None) -> None:
    """Replace tensor `kind` (see InProcessWorkers.slots) of every in-process model by its mean over
    the K local models and then, with `comm`, over the processes of `group` (default the world).

    Every process of the group must hold the same K (the mean of means is then the mean over all
    models). The local mean sums the K tensors in model order and divides by K; for K = 2 that is
    bitwise what an allreduce-mean over two processes gives, which the oracle tests rely on."""
    slots, means = _means(workers, kind, comm, group)
    for slot, mean in zip(slots, means, strict=True):
        for t in slot:
            t.copy_(mean)


@torch.no_grad()
def mean_of_workers(workers: InProcessWorkers, comm=None, group=None) -> State:
    """The mean model of every process's K models (as `mean_over_workers_` computes it), as an ordinary
    state dict; the workers are left as they are. Buffers are local model 0's (recompute BN after)."""
    state = workers.model_state_dict(0)
    _, means = _means(workers, "params", comm, group)
    state.update(zip(workers.param_names, means, strict=True))
    return state
