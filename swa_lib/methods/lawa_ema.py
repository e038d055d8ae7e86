"""LAWA and EMA as training-loop methods: plain SGD, plus averages evaluated on the side.

The averages themselves (LAWA, EMA: objects any loop can drive) are swa_lib/averaging/lawa_ema.py;
this module is their config and the strategy that drives them from the one loop.

Three registered methods share one strategy:

  lawa      one LAWA average, evaluated as "lawa" (the run's result once the queue is full)
  ema       one EMA average, evaluated as "ema"
  averages  several LAWA and EMA averages of ONE training run (window sweeps). Because an
            average never feeds back into training, K averages of one run with seed s are
            exactly the K runs "+ average k" with seed s, at the training cost of one.

Evaluation follows AlgoPerf's prepare_for_eval idea: each average has its own evaluation
copy of the network; before every evaluation the training model's full state is copied
into it (so non-averaged buffers are current) and the averaged tensors are written over
it. The training model, its optimizer and the RNG streams are never touched. With
`bn: recompute` only parameters are averaged and the copy's BN statistics are recomputed
over training data (the loop does it: EvalTarget.recompute_bn); with `bn: average` the BN running statistics are
averaged like parameters, which costs no extra pass over the data.

An average with `eval_every_steps: N` is evaluated only at the evaluations whose step is a
multiple of N, and at the end of training: a sweep of many averages can ride along one
time-to-target run whose main averages are evaluated every `eval.every_steps`, without paying
for every average at every evaluation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from swa_lib.averaging.lawa_ema import EMA, LAWA
from swa_lib.methods.base import EvalTarget, Strategy
from swa_lib.sections import from_dict

BN_MODES = ("average", "recompute")
BUFFER_DEVICES = ("device", "cpu")


def _eval_every_problems(where: str, every: int | None, cfg) -> list[str]:
    if every is None:
        return []
    grid = cfg.eval.every_steps
    if not isinstance(every, int) or every < 1:
        return [f"{where}.eval_every_steps: {every!r} must be an integer >= 1 or null (every evaluation)"]
    if not grid or every % grid:
        return [f"{where}.eval_every_steps: {every} must be a multiple of eval.every_steps ({grid}), "
                f"else the average is never evaluated before the end of training"]
    return []


def _common_problems(where: str, bn: str, buffer_device: str) -> list[str]:
    p = []
    if bn not in BN_MODES:
        p.append(f"{where}.bn: {bn!r} is not one of {', '.join(BN_MODES)}")
    if buffer_device not in BUFFER_DEVICES:
        p.append(f"{where}.buffer_device: {buffer_device!r} is not one of {', '.join(BUFFER_DEVICES)}")
    return p


@dataclass
class LAWAConfig:
    """LAWA: the mean of the last `window` snapshots, one every `every_steps` optimizer steps."""

    name: ClassVar[str] = "lawa"
    every_steps: int = 64  # nu; the paper recommends 64-128 on AlgoPerf (verified)
    window: int = 20  # L, snapshots averaged; the paper's L = 20 (verified)
    bn: str = "average"  # average (BN statistics averaged too) | recompute (update_bn before each eval)
    buffer_device: str = "device"  # device | cpu (pinned host memory, filled asynchronously on a GPU)
    eval_every_steps: int | None = None  # evaluated only at steps that are multiples of it (and at the end)

    def validate(self, cfg, where: str = "method") -> list[str]:
        p = _common_problems(where, self.bn, self.buffer_device)
        p += _eval_every_problems(where, self.eval_every_steps, cfg)
        if self.every_steps < 1:
            p.append(f"{where}.every_steps: {self.every_steps} must be >= 1")
        if self.window < 1:
            p.append(f"{where}.window: {self.window} must be >= 1")
        return p

    def label(self) -> str:
        return f"lawa_nu{self.every_steps}_L{self.window}"


@dataclass
class EMAConfig:
    """EMA: theta_ema <- decay * theta_ema + (1 - decay) * theta, every `every_steps` steps."""

    name: ClassVar[str] = "ema"
    every_steps: int = 64  # nu; the paper recommends 64-128 (verified)
    decay: float = 0.9  # beta; the paper's 0.9 at nu 64-128 (verified)
    warmup: bool = False  # beta_k = min(decay, (1 + k) / (10 + k)) for the k-th update
    bn: str = "average"
    buffer_device: str = "device"
    eval_every_steps: int | None = None  # as LAWAConfig's

    def validate(self, cfg, where: str = "method") -> list[str]:
        p = _common_problems(where, self.bn, self.buffer_device)
        p += _eval_every_problems(where, self.eval_every_steps, cfg)
        if self.every_steps < 1:
            p.append(f"{where}.every_steps: {self.every_steps} must be >= 1")
        if not 0 < self.decay < 1:
            p.append(f"{where}.decay: {self.decay} must be in (0, 1)")
        return p

    def label(self) -> str:
        return f"ema_nu{self.every_steps}_b{self.decay:g}" + ("_wu" if self.warmup else "")


@dataclass
class AveragesConfig:
    """Several LAWA/EMA averages of one run; each list entry holds that method's own keys
    (e.g. {every_steps: 4, window: 5}); bn and buffer_device are shared."""

    name: ClassVar[str] = "averages"
    lawa: list = field(default_factory=list)  # entries of LAWAConfig keys, evaluated as lawa_nu<nu>_L<L>
    ema: list = field(default_factory=list)  # entries of EMAConfig keys, evaluated as ema_nu<nu>_b<decay>
    bn: str = "average"
    buffer_device: str = "device"

    def entries(self, problems: list[str] | None = None) -> list:
        """The typed LAWAConfig/EMAConfig of every entry (type errors go to `problems`)."""
        problems = [] if problems is None else problems
        out = []
        for key, cls in (("lawa", LAWAConfig), ("ema", EMAConfig)):
            for i, entry in enumerate(getattr(self, key)):
                where = f"method.{key}[{i}]"
                if not isinstance(entry, dict) or {"bn", "buffer_device"} & set(entry):
                    problems.append(f"{where}: {entry!r} must be a mapping of {cls.name} keys without bn/buffer_device")
                    continue
                out.append((where, from_dict(cls, {**entry, "bn": self.bn, "buffer_device": self.buffer_device},
                                             where, problems)))
        return out

    def validate(self, cfg) -> list[str]:
        p = _common_problems("method", self.bn, self.buffer_device)
        entries = self.entries(p)
        if not self.lawa and not self.ema:
            p.append("method.lawa/method.ema: give at least one average")
        for where, entry in entries:
            p += entry.validate(cfg, where)
        labels = [e.label() for _, e in entries]
        p += [f"method: the average {name} is listed twice" for name in sorted(set(labels)) if labels.count(name) > 1]
        return p


def build_average(entry, model):
    """A LAWA or EMA object from its config (what `averages` builds once per entry)."""
    buffers = entry.bn == "average"
    if isinstance(entry, LAWAConfig):
        return LAWA(model, entry.every_steps, entry.window, buffers, entry.buffer_device)
    return EMA(model, entry.every_steps, entry.decay, entry.warmup, buffers, entry.buffer_device)


class WeightAverages(Strategy):
    """Synchronous SGD whose weights are also averaged (LAWA/EMA) and evaluated on the side.

    Distributed: under data parallelism every process holds the same parameters, so their
    averages agree without communication. BN running statistics are the exception: each
    process keeps those of its own batches. With `bn: average`, before every step that takes
    a snapshot the float buffers are replaced by their mean over the gradient group (one small
    allreduce, what the loop does before every evaluation anyway), so every process holds
    bitwise the same averages and the saved model is the one every process evaluated.
    """

    def setup(self, ctx) -> None:
        super().setup(ctx)
        m = self.cfg.method
        if isinstance(m, AveragesConfig):
            named = [(e.label(), e) for _, e in m.entries()]
            self.primary = "model"
        else:
            named = [(m.name, m)]
            self.primary = m.name
        self.averages = {name: build_average(e, ctx.model) for name, e in named}
        self.eval_every = {name: e.eval_every_steps for name, e in named}
        self.recompute_bn = m.bn == "recompute"
        # One evaluation copy per average: the loop evaluates all targets after collecting them.
        self.eval_models = {name: copy.deepcopy(ctx.model) for name in self.averages}

    @property
    def output_name(self) -> str:
        """The average, once it exists; a run too short to fill the LAWA queue reports the model."""
        return self.primary if self.primary == "model" or self.averages[self.primary].ready else "model"

    def after_step(self, step: int) -> None:
        group = self.gradient_group()
        if not self.recompute_bn and group.size > 1 and any(step % a.every_steps == 0 for a in self.averages.values()):
            # Distributed: one set of BN statistics for the snapshot, the same on every process.
            buffers = [b for b in self.ctx.model.buffers() if b.is_floating_point()]
            self.ctx.comm.allreduce_(buffers, "mean", group)
        for average in self.averages.values():
            average.update(self.ctx.model, step)  # reads the training model, never writes it

    def eval_targets(self):
        targets = {}
        end = self.ctx.epoch >= self.cfg.schedule.epochs
        for name, average in self.averages.items():
            if not average.ready:
                continue  # LAWA is evaluated only once its queue is full
            every = self.eval_every[name]
            if every and self.ctx.step % every and not end:
                continue  # off its own evaluation grid
            model = self.eval_models[name]
            model.load_state_dict(self.ctx.model.state_dict())  # non-averaged state, e.g. num_batches_tracked
            average.copy_to(model)
            targets[name] = EvalTarget(model, recompute_bn=self.recompute_bn)
        return targets

    def state_dict(self) -> dict:
        return {name: average.state_dict() for name, average in self.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.averages):
            raise ValueError(f"checkpoint holds averages {sorted(state)}, this config has {sorted(self.averages)}")
        for name, average in self.averages.items():
            average.load_state_dict(state[name])
