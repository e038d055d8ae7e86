"""SWALP's low-precision SGD as a wrapper around torch.optim.SGD."""

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import SGD, Optimizer

from swa_lib.quant.number import BlockFloat, check_format
from swa_lib.quant.quantize import quantize

ACCUMULATOR_KEY = "weight_accumulator"  # per-parameter optimizer state, saved in checkpoints


class QuantizedSGD(Optimizer):
    """SGD with block-floating-point gradients, momentum, weight accumulator and weights.

    SWALP (Yang et al., ICML 2019, arXiv 1904.11943). Each tensor kind has its own
    format; None leaves it in full precision, and with every format None `step()` is
    exactly the wrapped SGD's step (bitwise).

    Args:
        optimizer: the torch.optim.SGD to wrap (momentum, dampening, weight decay,
            nesterov, maximize as it is configured). Its param_groups and state are
            shared, not copied, so LR schedulers and checkpoints see one optimizer.
        fmt_weight: format of the weights the model computes with.
        fmt_grad: format of the gradients.
        fmt_momentum: format of the momentum buffer (official code: the grad format).
        fmt_acc: format of the weight accumulator (the master weights).
        generator: optional torch.Generator (on the parameters' device) for every
            stochastic rounding here. Draws happen in a fixed order: gradients, then per
            parameter accumulator, weight, momentum.
        fused: quantize with the compiled kernels of `quantize(..., fused=True)`.

    One step, in the order of the official `utils.train_batch`:
      1. g <- Q_grad(g) (the gradient came from the low-precision weights).
      2. If fmt_weight is set, the parameters are swapped to the accumulator a
         (master weights); the first step starts it from the current weights.
      3. The wrapped SGD steps on a: d = g + wd * a, m <- mu * m + (1 - dampening) d,
         a <- a - lr * m (nesterov, maximize as SGD does them).
      4. a <- Q_acc(a); weights w <- Q_weight(a), which is a itself when the two
         formats are equal (as in the official scripts). Without fmt_weight there is
         no separate accumulator and w <- Q_acc(w).
      5. m <- Q_momentum(m), so the next step starts from a low-precision buffer.
    Parameters keep their storage (in-place copies), so views and hooks stay valid.
    As in the official code, the first forward uses the initial, unquantized weights.
    The accumulator is kept in `state[p]["weight_accumulator"]`, so it is in
    `state_dict()`. A closure, if given, runs before the gradients are quantized.

    Distributed: under data parallel training, gradients are averaged (allreduce in
    fp32) before `step()` quantizes them: quantize-after-allreduce. Every rank then
    quantizes the same averaged gradient; given a generator seeded identically on all
    ranks (or nearest rounding), the replicas stay identical with no extra communication.
    Quantize-before-allreduce would emulate 8-bit communication, which SWALP does not
    claim (it quantizes computation, not communication).

    Example:
        >>> f8 = BlockFloat(8, "small", "stochastic")
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
        ...                       weight_decay=5e-4)
        >>> optimizer = QuantizedSGD(sgd, fmt_weight=f8, fmt_grad=f8, fmt_momentum=f8,
        ...                          fmt_acc=f8)
    """

    def __init__(self, optimizer: SGD, fmt_weight: BlockFloat | None = None,
                 fmt_grad: BlockFloat | None = None,
                 fmt_momentum: BlockFloat | None = None,
                 fmt_acc: BlockFloat | None = None,
                 generator: torch.Generator | None = None, fused: bool = False):
        if not isinstance(optimizer, SGD):
            raise TypeError(f"QuantizedSGD wraps a torch.optim.SGD, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.fmt_weight = check_format(fmt_weight, "fmt_weight")
        self.fmt_grad = check_format(fmt_grad, "fmt_grad")
        self.fmt_momentum = check_format(fmt_momentum, "fmt_momentum")
        self.fmt_acc = check_format(fmt_acc, "fmt_acc")
        self.generator = generator
        self.fused = fused
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._share_with_inner()

    def _share_with_inner(self) -> None:
        # Optimizer.__init__ and load_state_dict build new containers; point them back.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]
                if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SWALP step (see the class docstring for the order); returns the loss
        from `closure` if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params_with_grad()
        if self.fmt_grad is not None:
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("QuantizedSGD: fmt_grad cannot quantize a sparse "
                                     "gradient; expected dense gradients")
                p.grad.copy_(quantize(p.grad, self.fmt_grad, self.generator, self.fused))
        if self.fmt_weight is not None:
            for p in params:
                state = self.state[p]
                if ACCUMULATOR_KEY not in state:
                    state[ACCUMULATOR_KEY] = p.detach().clone()
                p.copy_(state[ACCUMULATOR_KEY])  # SWALP: SGD updates the master weights
        self.optimizer.step()
        for p in params:
            state = self.state[p]
            if self.fmt_weight is not None:
                accumulator = state[ACCUMULATOR_KEY]
                accumulator.copy_(quantize(p, self.fmt_acc, self.generator, self.fused))
                if self.fmt_weight == self.fmt_acc:
                    p.copy_(accumulator)  # quantize is idempotent: Q(Q(a)) = Q(a)
                else:
                    p.copy_(quantize(accumulator, self.fmt_weight, self.generator, self.fused))
            elif self.fmt_acc is not None:
                p.copy_(quantize(p, self.fmt_acc, self.generator, self.fused))
            momentum = state.get("momentum_buffer")
            if self.fmt_momentum is not None and momentum is not None:
                momentum.copy_(quantize(momentum, self.fmt_momentum, self.generator, self.fused))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped SGD's state_dict; it includes the weight accumulators."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped SGD and share its new state and param_groups."""
        self.optimizer.load_state_dict(state_dict)
        self._share_with_inner()

    def __repr__(self) -> str:
        formats = ", ".join(f"{kind}={fmt}" for kind, fmt in (
            ("weight", self.fmt_weight), ("grad", self.fmt_grad),
            ("momentum", self.fmt_momentum), ("acc", self.fmt_acc)))
        fused = ", fused" if self.fused else ""
        return f"QuantizedSGD({formats}{fused}) around {self.optimizer!r}"
