"""Flat views of a model's averaged tensors: what every average (LAWA, EMA, HWA's window) and
every model-wide allreduce (swa_lib.comm.average_model_) covers, in one fixed order."""
from __future__ import annotations

import torch
from torch import nn


def averaged_tensors(model: nn.Module, include_buffers: bool) -> list[torch.Tensor]:
    """The tensors an average covers, in a fixed order: parameters, then float buffers."""
    tensors = [p.detach() for p in model.parameters()]
    if include_buffers:
        tensors += [b for b in model.buffers() if b.is_floating_point()]
    return tensors


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
