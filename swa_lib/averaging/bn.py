"""Batch-norm recompute for averaged models, over one process or a process group.

An average of weights is not matched by an average of BN running statistics, so every
averaging method recomputes them on training data before evaluating (Izmailov et al.
2018, section 3.2). torch.optim.swa_utils.update_bn does this on one process with a
cumulative (equal-weight) average over batches. Here each process does that on its own
shard and the group then takes the mean of those per-process averages. With the same
number of batches on every process (our training loaders drop the last partial batch)
that is exactly the equal-weight average over all batches the group saw, i.e. what one
process would get from update_bn over the union of the shards.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running mean and variance of every batch-norm layer in `model`."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            out += [module.running_mean, module.running_var]
    return out


def update_bn_(model: nn.Module, batches: Iterable, *, comm=None, group=None,
               max_batches: int | None = None, device: torch.device | None = None) -> None:
    """Recompute BN running statistics of `model` in place from training `batches`.

    Args:
        model: the (averaged) model; a model without batch norm is left untouched.
        batches: an iterable of inputs or (inputs, targets) pairs, this process's shard.
        comm, group: if given, combine the per-process statistics over `group` (default
            the world). Every process of the group must call this with the same number
            of batches.
        max_batches: use only the first `max_batches` batches (a cheaper estimate).
        device: where to move inputs, if they are not there yet.
    """
    buffers = bn_buffers(model)
    if not buffers:
        return
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    update_bn(batches, model, device=device)
    if comm is not None:
        # Distributed: equal batch counts per process make the mean of means exact.
        comm.allreduce_(buffers, op="mean", group=group)


def recompute_bn_(model: nn.Module, workload, shard, epoch: int, *, comm=None, group=None,
                  max_batches: int | None = None, device: torch.device | None = None) -> None:
    """`update_bn_` on the training batches of `shard` (a DataShard) in `epoch`'s data order.

    What every method's BN recompute reads: the loop's for its evaluation targets, SWAP's phase 3
    (over the world) and its survivors (alone). Setting the epoch makes the batches independent
    of what the cached loader did last, so a resumed run recomputes on the same ones.

    `shard` may be a list of DataShards, one per model this process trains in-process
    (swa_lib.inprocess): the statistics are then recomputed on each, and their mean is what the
    process contributes to the group's mean, as if each shard were a process of its own."""
    shards = list(shard) if isinstance(shard, (list, tuple)) else [shard]
    per_shard = []
    for one in shards:
        loader = workload.train_loader(one)
        loader.set_epoch(epoch)
        update_bn_(model, loader, comm=comm if len(shards) == 1 else None, group=group, max_batches=max_batches,
                   device=device)
        if len(shards) > 1:
            per_shard.append([b.clone() for b in bn_buffers(model)])
    if len(shards) > 1:
        with torch.no_grad():
            for b, values in zip(bn_buffers(model), zip(*per_shard, strict=True), strict=True):
                b.copy_(torch.stack(values).sum(0).div_(len(values)))  # Sum then divide: an allreduce-mean of 2
        if comm is not None:
            comm.allreduce_(bn_buffers(model), op="mean", group=group)  # Distributed
