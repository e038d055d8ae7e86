"""LAWA and EMA weight averages (Ajroldi, Orvieto, Geiping, ICML 2025, arXiv 2502.06761).

Both are small objects that any training loop can drive; they never write to the
training model, so they cannot change training:

    lawa = LAWA(model, every_steps=64, window=20)        # the mean of the last 20 snapshots
    ema = EMA(model, every_steps=64, decay=0.9)          # theta_ema <- 0.9 theta_ema + 0.1 theta
    for step in range(1, total_steps + 1):
        ...; optimizer.step()
        lawa.update(model, step); ema.update(model, step)  # a snapshot when step % every_steps == 0
    if lawa.ready:
        lawa.copy_to(eval_model)                           # then evaluate eval_model

Storage. The averaged tensors (parameters, plus floating-point buffers such as BN running
statistics when `include_buffers`) are kept as one flat vector, so an update is one or two
whole-vector operations whatever the model. LAWA keeps a ring buffer of L flat snapshots:
an update overwrites the oldest slot, a single O(params) copy. Its mean is computed only
when asked for (once per evaluation) from the L snapshots in float64, rounded once to the
model's dtype: exact, and O(L x params) but only per evaluation. A running float64 sum
would make that read O(params) but cost three extra float64 passes per update, each larger
than the copy itself, and accumulate rounding; updates are far more frequent than reads, so
we recompute (update costs: results/averaging_overhead_cpu.md).

Buffers on the CPU (`buffer_device="cpu"`) while the model is on a GPU: the snapshot is
first copied on the GPU into a staging vector (a device-to-device copy on the compute
stream, microseconds), then copied to pinned host memory on a side stream with
non_blocking=True, so the GPU keeps computing while the transfer runs. The CPU-side
bookkeeping (EMA's lerp, LAWA's count) is deferred to the next update or read, after the
transfer's event has completed; with every_steps >= 2 it has long finished, so neither
the GPU nor the Python thread waits. Without a GPU the same code does plain copies.
"""
from __future__ import annotations

import torch
from torch import nn

from swa_lib.averaging.flat import averaged_tensors


class _SnapshotAverage:
    """Shared machinery: the flat layout, where buffers live, and (a)synchronous snapshots.

    A subclass supplies `_take(sources)` (synchronous snapshot), `_host_destination()` and
    `_fold(flat)` (asynchronous: where the transfer lands, and folding it in later), and
    `average()` (the flat averaged vector).
    """

    def __init__(self, model: nn.Module, every_steps: int, include_buffers: bool, buffer_device: str):
        if every_steps < 1:
            raise ValueError(f"every_steps: {every_steps} must be >= 1")
        if buffer_device not in ("cpu", "device"):
            raise ValueError(f"buffer_device: {buffer_device!r} is not one of cpu, device")
        tensors = averaged_tensors(model, include_buffers)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"all averaged tensors must share one dtype, got {sorted(map(str, dtypes))}")
        self.every_steps, self.include_buffers = every_steps, include_buffers
        self.dtype, self.model_device = tensors[0].dtype, tensors[0].device
        self.shapes = [t.shape for t in tensors]
        self.numel = sum(t.numel() for t in tensors)
        self.device = torch.device("cpu") if buffer_device == "cpu" else self.model_device
        # GPU model + CPU buffers: transfers go through pinned memory on a side stream.
        self.asynchronous = self.model_device.type == "cuda" and self.device.type == "cpu"
        if self.asynchronous:
            self._staging = torch.empty(self.numel, dtype=self.dtype, device=self.model_device)
            self._stream = torch.cuda.Stream(self.model_device)
        self._pending = None  # (flat host snapshot, event) copied but not yet folded in

    # ------------------------------------------------------------------ helpers
    def _zeros(self, *shape, dtype=None) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype or self.dtype, device=self.device, pin_memory=self.asynchronous)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(flat[offset:offset + n].view(shape))
            offset += n
        return out

    def _sources(self, model: nn.Module) -> list[torch.Tensor]:
        tensors = averaged_tensors(model, self.include_buffers)
        if [t.shape for t in tensors] != self.shapes:
            raise ValueError("the model's tensors do not match the ones this average was built for")
        return tensors

    # ------------------------------------------------------------------ updates
    def update(self, model: nn.Module, step: int) -> bool:
        """Take a snapshot if `step` (optimizer steps done) is a multiple of every_steps."""
        if step % self.every_steps:
            return False
        self._fold_pending()
        sources = self._sources(model)
        if not self.asynchronous:
            self._take(sources)
            return True
        dest = self._host_destination()
        torch._foreach_copy_(self._views(self._staging), sources)  # on the compute stream: fast D2D
        self._stream.wait_stream(torch.cuda.current_stream(self.model_device))
        with torch.cuda.stream(self._stream):
            dest.copy_(self._staging, non_blocking=True)  # D2H overlaps the next training steps
            event = torch.cuda.Event()
            event.record()
        self._pending = (dest, event)
        return True

    def _fold_pending(self) -> None:
        if self._pending is not None:
            dest, event = self._pending
            event.synchronize()  # long finished unless every_steps is tiny
            self._pending = None
            self._fold(dest)

    def copy_to(self, model: nn.Module) -> None:
        """Write the average into `model` (an evaluation copy; never the training model)."""
        flat = self.average().to(self.model_device)
        with torch.no_grad():
            torch._foreach_copy_(self._sources(model), self._views(flat))


class LAWA(_SnapshotAverage):
    """Latest weight averaging: the uniform mean of the last `window` snapshots (Kaddour 2022;
    Sanyal et al. 2023; as evaluated by Ajroldi et al. 2025).

    Args:
        model: the training model (read at each snapshot, never written).
        every_steps: nu, optimizer steps between snapshots.
        window: L, snapshots in the queue; the mean exists only once it holds L of them.
        include_buffers: also average float buffers (BN statistics); else recompute them.
        buffer_device: "device" (the model's) or "cpu" (pinned, filled asynchronously on a GPU).
    """

    def __init__(self, model: nn.Module, every_steps: int, window: int, include_buffers: bool = True,
                 buffer_device: str = "device"):
        if window < 1:
            raise ValueError(f"window: {window} must be >= 1")
        super().__init__(model, every_steps, include_buffers, buffer_device)
        self.window = window
        self.ring = self._zeros(window, self.numel)  # slot i holds snapshot number k with k % window == i
        self.n_snapshots = 0  # snapshots completed (folded in)
        self._mean = None  # cache: valid until the next snapshot

    @property
    def ready(self) -> bool:
        self._fold_pending()
        return self.n_snapshots >= self.window

    def _slot(self) -> torch.Tensor:
        self._mean = None
        return self.ring[self.n_snapshots % self.window]  # the oldest snapshot leaves the queue

    def _take(self, sources):
        torch._foreach_copy_(self._views(self._slot()), sources)
        self.n_snapshots += 1

    def _host_destination(self) -> torch.Tensor:
        return self._slot()

    def _fold(self, slot: torch.Tensor) -> None:
        self.n_snapshots += 1

    def average(self) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError(f"LAWA holds {self.n_snapshots} of {self.window} snapshots; its mean is not defined yet")
        if self._mean is None:
            total = self.ring[0].double()
            for slot in self.ring[1:]:
                total += slot.double()
            self._mean = (total / self.window).to(self.dtype)
        return self._mean

    def state_dict(self) -> dict:
        self._fold_pending()
        return {"ring": self.ring.cpu(), "n_snapshots": self.n_snapshots, "every_steps": self.every_steps}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["ring"].shape) != tuple(self.ring.shape) or state["every_steps"] != self.every_steps:
            raise ValueError(f"LAWA state has ring {tuple(state['ring'].shape)} and "
                             f"every_steps {state['every_steps']}; "
                             f"this LAWA has {tuple(self.ring.shape)} and {self.every_steps}")
        self._fold_pending()  # an in-flight transfer must land before the slots are overwritten
        self._mean = None
        self.ring.copy_(state["ring"])
        self.n_snapshots = int(state["n_snapshots"])


class EMA(_SnapshotAverage):
    """Exponential moving average of the weights, updated every `every_steps` steps.

    theta_ema starts as the model's weights at construction. The k-th update (k = 0, 1, ...)
    uses beta_k = min(decay, (1 + k) / (10 + k)) with `warmup` (the form of TensorFlow's
    ExponentialMovingAverage num_updates), else decay. Warm-up matters when decay is close
    to 1: without it the random initial weights keep a weight decay^k for thousands of
    updates; with it the early EMA is close to an equal mean of the snapshots seen so far.

    Args:
        model, every_steps, include_buffers, buffer_device: as for LAWA.
        decay: beta in (0, 1).
        warmup: ramp beta up as above.
    """

    def __init__(self, model: nn.Module, every_steps: int, decay: float, warmup: bool = False,
                 include_buffers: bool = True, buffer_device: str = "device"):
        if not 0 < decay < 1:
            raise ValueError(f"decay: {decay} must be in (0, 1)")
        super().__init__(model, every_steps, include_buffers, buffer_device)
        self.decay, self.warmup = decay, warmup
        self.ema = self._zeros(self.numel)
        self.ema.copy_(torch.cat([t.reshape(-1) for t in self._sources(model)]).to(self.device))
        self.n_updates = 0
        if self.asynchronous:
            self._host_staging = self._zeros(self.numel)

    @property
    def ready(self) -> bool:
        """True after the first update (before it, the "average" is only the initial weights)."""
        self._fold_pending()
        return self.n_updates > 0

    def beta(self, k: int) -> float:
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    def _take(self, sources):
        weight = 1 - self.beta(self.n_updates)
        torch._foreach_lerp_(self._views(self.ema), sources, weight)
        self.n_updates += 1

    def _host_destination(self) -> torch.Tensor:
        return self._host_staging

    def _fold(self, flat: torch.Tensor) -> None:
        self.ema.lerp_(flat, 1 - self.beta(self.n_updates))
        self.n_updates += 1

    def average(self) -> torch.Tensor:
        self._fold_pending()
        return self.ema

    def state_dict(self) -> dict:
        self._fold_pending()
        return {"ema": self.ema.cpu(), "n_updates": self.n_updates, "every_steps": self.every_steps,
                "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.numel, self.every_steps, self.decay, self.warmup)
        theirs = (state["ema"].numel(), state["every_steps"], state["decay"], state["warmup"])
        if mine != theirs:
            raise ValueError(f"EMA state (numel, every_steps, decay, warmup) = {theirs}; this EMA has {mine}")
        self._fold_pending()
        self.ema.copy_(state["ema"])
        self.n_updates = int(state["n_updates"])
