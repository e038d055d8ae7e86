"""A small fingerprint of a state dict: exact (sha256 of the bytes) and approximate (projections).

The sha256 can only match on the machine, torch build and thread count that wrote it
(results/determinism_cpu.md). The projections are compared with a tolerance elsewhere: 16
fixed random directions plus the sum and the norm of all floats, per state dict, in float64.
A changed average (a missing snapshot, another decay, BN statistics not recomputed) moves
them by far more than a different CPU's rounding does in a few steps.
"""
import hashlib

import torch

PROJECTIONS = 16


def digest(state: dict) -> dict:
    sha = hashlib.sha256()
    floats, ints = [], {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        sha.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        if t.is_floating_point():
            floats.append(t.double().reshape(-1))
        else:
            ints[name] = t.reshape(-1).tolist()
    flat = torch.cat(floats) if floats else torch.zeros(0, dtype=torch.float64)
    directions = torch.randn(PROJECTIONS, flat.numel(), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1234))
    return {"sha256": sha.hexdigest(), "keys": list(state), "numel": flat.numel(), "ints": ints,
            "sum": flat.sum().item(), "norm": flat.norm().item(), "projections": (directions @ flat).tolist()}
