"""Wall time per named phase of a run, synchronised with the GPU (what the tables' time columns read)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch


@dataclass
class PhaseTimer:
    """Wall seconds per named phase (train, eval, bn_update, checkpoint, and method phases)."""

    device: torch.device
    totals: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
