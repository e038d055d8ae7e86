"""K models training side by side in one process: SWAP phase-2 workers or HWA groups without K processes.

Two implementations behind one interface (`InProcessWorkers`):

  StackedWorkers     vectorised. The K models' parameters and buffers are stacked along a new
                     leading dim (torch.func.stack_module_state) and one forward of a [K, B, ...]
                     input runs all K at once (torch.func.vmap over torch.func.functional_call).
  SequentialWorkers  K ordinary nn.Module copies, each with its own optimizer, run in a loop.
                     The fallback for models vmap cannot batch, and the oracle-exact path: its
                     weights are bitwise those of K models trained one by one.

What each model sees is exactly what it would see alone:
- Batch norm. vmap runs batch norm per slice, so model k's batch statistics come from its own
  batch x[k] only. The running statistics are stacked buffers passed to vmap as batched inputs;
  BN's in-place `running_mean.mul_(...).add_(...)` on a batched tensor writes through to slice k
  of the stacked buffer, so every model keeps its own running mean, variance and
  num_batches_tracked. (torch.func.replace_all_batch_norm_modules_ would instead drop the
  running statistics, and unbatched buffers make vmap refuse the in-place update.)
- Gradients. `train_step` backpropagates the sum over k of model k's own mean loss; model k's
  parameters appear only in loss k, so their gradient is that of its own mean loss, not divided
  by K.
- The optimizer. StackedWorkers builds ONE optimizer over the stacked tensors. SGD's update
  (weight decay, momentum, dampening, nesterov) is elementwise, so with one shared learning rate
  it is K independent SGD optimizers (tests/test_stacked.py checks it). That holds for any
  elementwise optimizer (SGD, Adam, AdamW), never for one that uses a per-tensor norm (LARS,
  LAMB, gradient clipping by norm): the norm would mix the K models. Per-model learning rates
  are not supported on this path (SWAP's workers and HWA's groups share one schedule).

Both paths exchange models and optimizer states as ORDINARY single-model state dicts
(`model_state_dict(k)`, `optimizer_state_dict(k)`, the inverse `load_...`), so evaluation,
checkpoints, BN recompute and averaging use plain modules, and a checkpoint written by one path
loads into the other. Precision: fp32 is what is tested. On the vectorised path the tensors are
5-D stacks (no channels_last layout) and vmap turns each conv into a grouped conv over K; the
sequential path takes whatever memory format and autocast the caller uses. Models that draw
random numbers (dropout) draw from the global RNG in another order than K processes would.

How the loop uses it (`method.workers_in_process`, SWAP and HWA): a process holds K_local
models, each a "virtual rank" with its own data shard (see swa_lib.inprocess). Data-parallel
phases average the K_local gradients (`slots("grads")` through
swa_lib.averaging.workers.mean_over_workers_) between `forward_backward` and `step`;
independent workers skip that. Averages load back with `load_model_state_dict`.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

MakeOptimizer = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SLOT_KINDS = ("params", "grads", "bn", "float_buffers", "momentum")


def _buffer_names(model: nn.Module) -> dict[str, list[str]]:
    """Names (as in state_dict) of the buffers each buffer slot kind covers, in bn_buffers' order."""
    bn = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            bn += [f"{prefix}.running_mean" if prefix else "running_mean",
                   f"{prefix}.running_var" if prefix else "running_var"]
    floats = [name for name, b in model.named_buffers() if b.is_floating_point()]
    return {"bn": bn, "float_buffers": floats}


def stacked_batches(loaders: Sequence[Iterable]) -> Iterator[tuple[torch.Tensor, ...]]:
    """One step's batches of K data streams stacked: (x [K, B, ...], y [K, B]) from K (x, y) loaders.

    Stream k is worker k's own loader (own shard, seed and order). Ends with the shortest stream."""
    for batches in zip(*loaders):
        yield tuple(torch.stack(parts) for parts in zip(*batches))


class InProcessWorkers:
    """K models trained side by side in one process; see the module docstring. Subclasses fill the
    `_...` hooks; everything else (train_step, checkpoints, module(k)) is shared."""

    def __init__(self, modules: Sequence[nn.Module]):
        if len(modules) < 1:
            raise ValueError("InProcessWorkers needs at least one module")
        self.num_workers = len(modules)
        # A real copy of model 0: the shape every ordinary state dict of model k is loaded into.
        self._template = copy.deepcopy(modules[0])
        self._slot_names = _buffer_names(self._template)
        self.training = True

    def __len__(self) -> int:
        return self.num_workers

    @property
    def param_names(self) -> list[str]:
        """The parameters' names, in the order of `slots("params")` and of `model.parameters()`."""
        return [name for name, _ in self._template.named_parameters()]

    # -- what every loop uses ------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Model k applied to x[k], for every k: x is [K, B, ...], the result [K, B, ...]."""
        if x.shape[0] != self.num_workers:
            raise ValueError(f"input has {x.shape[0]} slices along dim 0, expected one per model "
                             f"({self.num_workers})")
        return self._forward(x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                   lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every model on its own batch; returns (losses [K], outputs), detached.

        Args:
            x, y: [K, B, ...] inputs and [K, B] targets; model k trains on (x[k], y[k]) only.
            loss_fn: (outputs of one model, its targets) -> that model's mean loss.
            lr: if given, set as every model's learning rate first.
        """
        if lr is not None:
            self.set_lr(lr)
        out = self.forward_backward(x, y, loss_fn)
        self.step()
        return out

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                         autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first half of `train_step`: every model's gradient of its own mean loss, in `.grad`.

        Between it and `step` a loop may change the gradients (average them over data-parallel
        replicas: `swa_lib.averaging.workers.mean_over_workers_(workers, "grads", ...)`).
        `autocast`: a context the forward pass and loss run under (the sequential path's bf16)."""
        with autocast or contextlib.nullcontext():
            return self._forward_backward(x, y, loss_fn)

    def step(self) -> None:
        """The second half of `train_step`: every model's optimizer step on its `.grad`."""
        for optimizer in self._optimizers():
            optimizer.step()

    def slots(self, kind: str) -> list[list[torch.Tensor]]:
        """Tensor `kind` of every model, as one list of K tensors (model 0..K-1) per tensor of a model.

        kind: "params"; "grads" (a missing grad becomes zeros); "bn" (batch-norm running mean and
        variance, as swa_lib.averaging.bn_buffers lists them); "float_buffers" (every
        floating-point buffer); "momentum" (the optimizer's momentum buffers, [] before the first
        step). Writing into a slot's tensors writes into the models (the stacked path's are views)."""
        if kind not in SLOT_KINDS:
            raise ValueError(f"slot kind {kind!r} is not one of {SLOT_KINDS}")
        names = self._slot_names[kind] if kind in self._slot_names else None
        return self._slots(kind, names)

    def train(self, mode: bool = True) -> InProcessWorkers:
        self.training = mode
        self._set_training(mode)
        return self

    def eval(self) -> InProcessWorkers:
        return self.train(False)

    def set_lr(self, lr: float) -> None:
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                group["lr"] = lr

    # -- model k as an ordinary module -----------------------------------------------------
    def model_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's weights and buffers as `nn.Module.state_dict()` of one model gives them (copies)."""
        raise NotImplementedError

    def load_model_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Overwrite model k with an ordinary single-model state dict (same keys as the template's)."""
        raise NotImplementedError

    def optimizer_state_dict(self, k: int) -> dict:
        """Model k's optimizer state as its own optimizer over `model.parameters()` would give it."""
        raise NotImplementedError

    def load_optimizer_state_dict(self, k: int, state: dict) -> None:
        """Load a single-model optimizer state (e.g. SWAP's phase-1 momentum) into model k's optimizer.

        Only the per-parameter state (momentum buffers) is taken; the hyperparameters stay the
        workers' own (shared; set the LR with `set_lr`)."""
        raise NotImplementedError

    def module(self, k: int) -> nn.Module:
        """A new plain module holding model k (for evaluation, BN recompute, saving). Independent of
        the workers: training it changes nothing here."""
        model = copy.deepcopy(self._template)
        model.load_state_dict(self.model_state_dict(k))
        return model.train(self.training)

    def state_dict(self) -> dict:
        """Everything to resume: K ordinary model and optimizer state dicts (loadable by either path)."""
        return {"models": [self.model_state_dict(k) for k in range(self.num_workers)],
                "optimizers": [self.optimizer_state_dict(k) for k in range(self.num_workers)]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["models"]) != self.num_workers:
            raise ValueError(f"checkpoint holds {len(state['models'])} models, these workers {self.num_workers}")
        for k in range(self.num_workers):
            self.load_model_state_dict(k, state["models"][k])
            self.load_optimizer_state_dict(k, state["optimizers"][k])

    # -- hooks ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_backward(self, x, y, loss_fn):
        raise NotImplementedError

    def _slots(self, kind: str, buffer_names: list[str] | None) -> list[list[torch.Tensor]]:
        raise NotImplementedError

    def _set_training(self, mode: bool) -> None:
        raise NotImplementedError

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def _check_keys(self, state: dict) -> None:
        want, got = set(self._template.state_dict()), set(state)
        if want != got:
            raise KeyError(f"state dict does not match the model: missing {sorted(want - got)}, "
                           f"unexpected {sorted(got - want)}")


class SequentialWorkers(InProcessWorkers):
    """K independent copies of the model(s), each with its own optimizer, stepped one after another.

    Args:
        modules: the K starting models (copied; pass `[model] * K` for K copies of one start).
        make_optimizer: builds one model's optimizer from its parameter list, e.g.
            `lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)`.
    """

    def __init__(self, modules: Sequence[nn.Module], make_optimizer: MakeOptimizer):
        super().__init__(modules)
        self.models = [copy.deepcopy(m) for m in modules]
        self.optimizers = [make_optimizer(list(m.parameters())) for m in self.models]

    def _forward(self, x):
        return torch.stack([model(x[k]) for k, model in enumerate(self.models)])

    def _forward_backward(self, x, y, loss_fn):
        losses, outputs = [], []
        for k, (model, optimizer) in enumerate(zip(self.models, self.optimizers, strict=True)):
            optimizer.zero_grad(set_to_none=True)
            out = model(x[k])
            loss = loss_fn(out, y[k])
            loss.backward()
            losses.append(loss.detach())
            outputs.append(out.detach())
        return torch.stack(losses), torch.stack(outputs)

    def _slots(self, kind, buffer_names):
        if kind in ("params", "grads", "momentum"):
            per_model = [list(m.parameters()) for m in self.models]
            if kind == "grads":
                for params in per_model:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                per_model = [[p.grad for p in params] for params in per_model]
            elif kind == "momentum":
                per_model = [[o.state[p]["momentum_buffer"] for p in params if "momentum_buffer" in o.state[p]]
                             for o, params in zip(self.optimizers, per_model, strict=True)]
            else:
                per_model = [[p.detach() for p in params] for params in per_model]
        else:
            per_model = [[dict(m.named_buffers())[name] for name in buffer_names] for m in self.models]
        return [list(slot) for slot in zip(*per_model, strict=True)]

    def _set_training(self, mode):
        for model in self.models:
            model.train(mode)

    def _optimizers(self):
        return self.optimizers

    def model_state_dict(self, k):
        return {name: t.detach().clone() for name, t in self.models[k].state_dict().items()}

    def load_model_state_dict(self, k, state):
        self._check_keys(state)
        self.models[k].load_state_dict(state)

    def optimizer_state_dict(self, k):
        return copy.deepcopy(self.optimizers[k].state_dict())

    def load_optimizer_state_dict(self, k, state):
        groups = self.optimizers[k].state_dict()["param_groups"]  # keep our own hyperparameters
        self.optimizers[k].load_state_dict({"state": copy.deepcopy(state["state"]), "param_groups": groups})


class StackedWorkers(InProcessWorkers):
    """K models as stacked tensors, run with one vmapped functional call and one optimizer.

    Args:
        modules: the K starting models, all of the same architecture (their tensors are copied).
        make_optimizer: builds the optimizer from the list of stacked parameters ([K, ...] each).
            It must be elementwise (see the module docstring); SGD is what the tests check.
    """

    def __init__(self, modules: Sequence[nn.Module], make_optimizer: MakeOptimizer):
        super().__init__(modules)
        params, buffers = stack_module_state(list(modules))  # copies; params are leaves with grad
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        self._param_names = [name for name, _ in self._template.named_parameters()]
        if list(self.params) != self._param_names:
            raise ValueError("stack_module_state ordered parameters differently from named_parameters()")
        # The architecture only: functional_call swaps the stacked slices in for its tensors.
        self._skeleton = copy.deepcopy(self._template).to("meta")
        self.optimizer = make_optimizer([self.params[name] for name in self._param_names])
        self._batched_call = vmap(self._call_one, randomness="different")

    def _call_one(self, params, buffers, x):
        return functional_call(self._skeleton, (params, buffers), (x,))

    def _forward(self, x):
        return self._batched_call(self.params, self.buffers, x)

    def _forward_backward(self, x, y, loss_fn):
        self.optimizer.zero_grad(set_to_none=True)
        out = self._forward(x)
        losses = torch.stack([loss_fn(out[k], y[k]) for k in range(self.num_workers)])
        # d(sum_j loss_j)/d(theta_k) = d(loss_k)/d(theta_k): each model gets its own mean loss's gradient.
        losses.sum().backward()
        return losses.detach(), out.detach()

    def _slots(self, kind, buffer_names):
        stacked = [self.params[name] for name in self._param_names]
        if kind == "grads":
            for p in stacked:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            stacked = [p.grad for p in stacked]
        elif kind == "momentum":
            stacked = [self.optimizer.state[p]["momentum_buffer"] for p in stacked
                       if "momentum_buffer" in self.optimizer.state[p]]
        elif kind != "params":
            stacked = [self.buffers[name] for name in buffer_names]
        return [list(t.detach().unbind(0)) for t in stacked]

    def _set_training(self, mode):
        self._skeleton.train(mode)

    def _optimizers(self):
        return [self.optimizer]

    def _stacked(self, name: str) -> torch.Tensor:
        return self.params[name] if name in self.params else self.buffers[name]

    def model_state_dict(self, k):
        return {name: self._stacked(name)[k].detach().clone() for name in self._template.state_dict()}

    @torch.no_grad()
    def load_model_state_dict(self, k, state):
        self._check_keys(state)
        for name in self._template.state_dict():
            self._stacked(name)[k].copy_(state[name])

    def optimizer_state_dict(self, k):
        full = self.optimizer.state_dict()
        # Per-element state tensors ([K, ...] like the stacked parameter) are sliced; per-tensor
        # ones (Adam's 0-d step, shared by all K) are copied.
        state = {i: {key: self._slice(v, i, k) for key, v in s.items()} for i, s in full["state"].items()}
        return {"state": state, "param_groups": copy.deepcopy(full["param_groups"])}

    def _slice(self, value, index: int, k: int):
        stacked = self.params[self._param_names[index]]
        if torch.is_tensor(value) and value.shape == stacked.shape:
            return value[k].clone()
        return copy.deepcopy(value)

    @torch.no_grad()
    def load_optimizer_state_dict(self, k, state):
        for index, per_param in state["state"].items():
            stacked = self.params[self._param_names[int(index)]]
            mine = self.optimizer.state[stacked]
            for key, value in per_param.items():
                if torch.is_tensor(value) and value.shape == stacked.shape[1:]:
                    # Models without this state yet get zeros: for SGD with dampening 0 that is the
                    # same as no momentum buffer (the first step sets buf = grad either way).
                    if key not in mine:
                        mine[key] = torch.zeros_like(stacked)
                    mine[key][k].copy_(value)
                else:
                    mine[key] = copy.deepcopy(value)


def build_workers(modules: Sequence[nn.Module], make_optimizer: MakeOptimizer, *,
                  vectorised: bool = True) -> InProcessWorkers:
    """K models in one process: `StackedWorkers` (vmap) if `vectorised`, else `SequentialWorkers`.

        workers = build_workers([model] * 4, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        for x, y in stacked_batches(loaders):           # x [4, B, 3, 32, 32], y [4, B]
            losses, _ = workers.train_step(x, y, F.cross_entropy, lr=lr_now)
        model_2 = workers.module(2)                     # a plain nn.Module
    """
    cls = StackedWorkers if vectorised else SequentialWorkers
    return cls(modules, make_optimizer)
