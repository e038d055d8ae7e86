"""Test loss and accuracy of one model, over one process or a group: the one evaluation loop."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, *, comm=None, group=None,
             autocast=None) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy} of `model` over (inputs, targets) `batches`.

    Args:
        batches: this process's share of the evaluation data.
        comm, group: if given, the sums are combined over `group`, so every process of it gets
            the result over the union of their batches.
        autocast: a context to run the forward pass under (the training precision); default fp32.
    The model is evaluated in eval mode and left in the mode it came in. Sums are float64.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
        sums += torch.stack([loss.double(), (out.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if comm is not None:
        comm.allreduce_([sums], op="sum", group=group)  # Distributed: the group covers the test set
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    return {"loss": loss_sum / count, "acc": correct / count}
