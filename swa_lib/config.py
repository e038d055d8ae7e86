"""Typed, validated run configuration: YAML file + dotted command-line overrides.

A config is a tree of dataclasses. Every field has a default and a comment saying
what it means; `validate` checks the invariants after merging, and collects every
problem at once so a user fixes their file in one go. Library functions never read a
global config: the entry point resolves it and passes the pieces down.

The ``method`` section is open: its ``name`` picks a strategy, and the strategy's own
dataclass (registered in ``swa_lib.methods``) types and validates the other keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A config value is wrong. Entry points print it and exit with code 2."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


@dataclass
class DataConfig:
    dataset: str = "cifar10_jpg"  # cifar10 | cifar10_jpg | cifar100 | tiny_imagenet | imagenet
    root: str = "../shared/data"  # relative paths are taken from the repo root; env SWA_DATA_ROOT wins
    cache_dir: str = "~/.cache/swa_lib/data"  # decoded uint8 arrays live here, not in the repo
    train_subset: int | None = None  # keep this many training images (class-balanced); None = all
    test_subset: int | None = None  # same for the test split
    # Hold out this many training images (class-balanced, fixed draw) and evaluate on them
    # instead of the test split: how hyper-parameters are tuned without looking at the test set.
    val_split: int | None = None
    image_size: int | None = None  # resize every image to this square size once (e.g. 32: downsampled Tiny-ImageNet)
    num_classes: int | None = None  # tiny_imagenet: keep the first K classes (reduced configs)
    augment: str = "cifar"  # cifar (crop 32 pad 4 + flip) | imagenet (random resized crop + flip) | none
    on_device: bool = False  # GPU: keep the whole uint8 set on the device so loading never starves it
    num_workers: int = 4  # imagenet streaming loader only


@dataclass
class ModelConfig:
    name: str = "resnet9"  # a model of the harness's registry (models.available_models())
    kwargs: dict = field(default_factory=dict)  # passed to the model constructor, e.g. {width: 16}


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate at `lr_reference_batch`
    lr_reference_batch: int | None = None  # if set, lr scales linearly with the global batch (Goyal et al.)
    batch_size: int = 128  # per process
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    epochs: int = 10  # training budget; every method in a table gets the same one
    kind: str = "cosine"  # cosine | linear | step | constant | swa_paper
    warmup_epochs: float = 0.0  # linear warmup from 0 (Goyal et al.), in epochs
    final_lr_fraction: float = 0.0  # cosine/linear/swa_paper: end LR as a fraction of the peak
    milestones_epochs: list = field(default_factory=list)  # step: epochs at which lr *= gamma
    gamma: float = 0.1  # step: decay factor
    # swa_paper (Izmailov et al. / SWALP code): factor 1 until 50% of reference_epochs, linear
    # down to final_lr_fraction by 90%, constant after. reference_epochs = swa_start for SWA runs.
    reference_epochs: float | None = None  # None = epochs
    # step: the LR is set before every optimizer step from the fractional epoch (step / steps
    # per epoch); epoch: once per epoch from the integer epoch, as the official SWA and SWALP
    # train scripts do (`adjust_learning_rate(optimizer, schedule(epoch))` before each epoch).
    lr_update: str = "step"


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate on the test split every N epochs (and always at the end)
    every_steps: int | None = None  # additionally every N optimizer steps (time-to-target runs)
    batch_size: int = 500
    bn_update_batches: int | None = None  # batches used to recompute BN of averaged models; None = one epoch


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | horovod | torch | single (auto: horovod under mpirun)


@dataclass
class RunConfig:
    seed: int = 0  # one seed drives init, data order and augmentation
    out_dir: str = "runs"  # run directories go under here
    name: str | None = None  # run directory name; None = derived from config file and seed
    device: str = "auto"  # auto | cpu | cuda
    # fp32 | bf16. bf16: the training model's forward and loss run under bf16 autocast (on the
    # GPU, and on the CPU too, so a label never claims a precision the run did not use).
    # Averaged models are always evaluated in fp32. fp32 is the default because the papers'
    # baselines and full-precision averages are fp32; a config that wants bf16 says so.
    precision: str = "fp32"
    channels_last: bool = True  # memory format of model and inputs
    checkpoint_every_epochs: int = 1  # 0 = only phase boundaries and the end
    keep_checkpoints: int = 2  # checkpoint generations kept on disk
    resume: bool = True  # continue from the run directory's latest checkpoint if there is one
    stop_after_epochs: int | None = None  # end this invocation after N epochs (job time limits); resume continues
    progress: bool = True  # tqdm bar on rank 0
    log_every_steps: int = 20  # train scalars to TensorBoard; also how often a NaN loss is checked


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    method: Any = None  # the strategy's own dataclass, filled in by load_config


DATASETS = ("cifar10", "cifar10_jpg", "cifar100", "tiny_imagenet", "imagenet")
AUGMENTS = ("cifar", "imagenet", "none")
SCHEDULES = ("cosine", "linear", "step", "constant", "swa_paper")
LR_UPDATES = ("step", "epoch")
BACKENDS = ("auto", "horovod", "torch", "single")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- loading

def _check_type(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Coerce `value` to the annotated type where lossless (int -> float), else report."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where, problems)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML follows YAML 1.1, which reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    base = origin or hint
    if base is Any:
        return value
    if base in (list, dict, str, int, float, bool):
        ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
        if not ok:
            problems.append(f"{where}: expected {base.__name__}, got {value!r} ({type(value).__name__})")
        return value
    return value


def from_dict(cls: type, data: dict | None, where: str, problems: list[str]):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    at = (lambda key: f"{where}.{key}") if where else (lambda key: key)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            problems.append(f"{at(key)}: unknown key; allowed: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(data[f.name], dict):
                problems.append(f"{at(f.name)}: expected a mapping, got {data[f.name]!r}")
                continue
            kwargs[f.name] = from_dict(hint, data[f.name], at(f.name), problems)
        else:
            before = len(problems)
            value = _check_type(data[f.name], hint, at(f.name), problems)
            if len(problems) == before:  # on a type error keep the default, so range checks still run
                kwargs[f.name] = value
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key.path=value, e.g. optim.lr=0.05"])
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is not a section"])
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = (), default_method: str = "sgd",
                model_names: Iterable[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, type it and validate it. Raises ConfigError.

    `model_names`: the names `model.name` may take (the harness passes its model registry,
    swa_lib.workload.model_names()); None leaves the name to be checked when the model is built.
    """
    from swa_lib.methods import method_config_class  # late: methods import this module

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path}: not found"])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"config file {path}: not valid YAML ({err})"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"config file {path}: top level must be a mapping"])
    raw = apply_overrides(raw, list(overrides))
    problems: list[str] = []
    run_raw = raw.get("run")
    if isinstance(run_raw, dict) and "amp" in run_raw:
        amp = run_raw.pop("amp")
        problems.append(f"run.amp: replaced by run.precision (fp32 | bf16, default fp32); write "
                        f"run.precision: {'bf16' if amp else 'fp32'} instead of run.amp: {amp}")
    method_raw = dict(raw.pop("method", None) or {})
    method_name = method_raw.pop("name", default_method)
    cfg = from_dict(Config, raw, "", problems)
    try:
        method_cls = method_config_class(method_name)
        cfg.method = from_dict(method_cls, method_raw, "method", problems)
    except KeyError as err:
        problems.append(f"method.name: {err.args[0]}")
    try:
        validate(cfg, model_names)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return cfg


# --------------------------------------------------------------------------- validation

def _choice(problems, where, value, allowed):
    if value not in allowed:
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(problems, where, value, allow_zero=False, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{where}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config, model_names: Iterable[str] | None = None) -> None:
    """Check every invariant of a merged config; raise ConfigError listing all problems.

    The library knows no models: `model_names` (see load_config) is what `model.name` is
    checked against, when given."""
    p: list[str] = []
    _choice(p, "data.dataset", cfg.data.dataset, DATASETS)
    _choice(p, "data.augment", cfg.data.augment, AUGMENTS)
    _positive(p, "data.train_subset", cfg.data.train_subset, allow_none=True)
    _positive(p, "data.test_subset", cfg.data.test_subset, allow_none=True)
    _positive(p, "data.val_split", cfg.data.val_split, allow_none=True)
    _positive(p, "data.image_size", cfg.data.image_size, allow_none=True)
    if cfg.data.val_split is not None and cfg.data.train_subset is not None \
            and cfg.data.val_split >= cfg.data.train_subset:
        p.append(f"data.val_split: {cfg.data.val_split} must be smaller than data.train_subset "
                 f"({cfg.data.train_subset}), or nothing is left to train on")
    if cfg.data.dataset == "imagenet" and (cfg.data.val_split or cfg.data.image_size):
        p.append("data.val_split / data.image_size: only for in-memory datasets, not streamed ImageNet folders")
    _positive(p, "data.num_classes", cfg.data.num_classes, allow_none=True)
    if model_names is not None:
        _choice(p, "model.name", cfg.model.name, sorted(model_names))
    _positive(p, "optim.lr", cfg.optim.lr)
    _positive(p, "optim.batch_size", cfg.optim.batch_size)
    _positive(p, "optim.lr_reference_batch", cfg.optim.lr_reference_batch, allow_none=True)
    _positive(p, "optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    if not 0 <= cfg.optim.momentum < 1:
        p.append(f"optim.momentum: {cfg.optim.momentum!r} must be in [0, 1)")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        p.append("optim.nesterov: needs optim.momentum > 0")
    if not 0 <= cfg.optim.label_smoothing < 1:
        p.append(f"optim.label_smoothing: {cfg.optim.label_smoothing!r} must be in [0, 1)")
    s = cfg.schedule
    _positive(p, "schedule.epochs", s.epochs)
    _choice(p, "schedule.kind", s.kind, SCHEDULES)
    _positive(p, "schedule.warmup_epochs", s.warmup_epochs, allow_zero=True)
    if s.warmup_epochs >= s.epochs > 0:
        p.append(f"schedule.warmup_epochs: {s.warmup_epochs} must be below schedule.epochs ({s.epochs})")
    if not 0 <= s.final_lr_fraction <= 1:
        p.append(f"schedule.final_lr_fraction: {s.final_lr_fraction!r} must be in [0, 1]")
    if s.kind == "step" and not s.milestones_epochs:
        p.append("schedule.milestones_epochs: a step schedule needs at least one milestone")
    if sorted(s.milestones_epochs) != list(s.milestones_epochs):
        p.append(f"schedule.milestones_epochs: {s.milestones_epochs} must be increasing")
    _positive(p, "schedule.reference_epochs", s.reference_epochs, allow_none=True)
    _choice(p, "schedule.lr_update", s.lr_update, LR_UPDATES)
    _positive(p, "eval.every_epochs", cfg.eval.every_epochs)
    _positive(p, "eval.every_steps", cfg.eval.every_steps, allow_none=True)
    _positive(p, "eval.batch_size", cfg.eval.batch_size)
    _positive(p, "eval.bn_update_batches", cfg.eval.bn_update_batches, allow_none=True)
    _choice(p, "dist.backend", cfg.dist.backend, BACKENDS)
    _choice(p, "run.device", cfg.run.device, DEVICES)
    _choice(p, "run.precision", cfg.run.precision, PRECISIONS)
    _positive(p, "run.checkpoint_every_epochs", cfg.run.checkpoint_every_epochs, allow_zero=True)
    _positive(p, "run.keep_checkpoints", cfg.run.keep_checkpoints)
    _positive(p, "run.log_every_steps", cfg.run.log_every_steps)
    _positive(p, "run.stop_after_epochs", cfg.run.stop_after_epochs, allow_none=True)
    validate_method = getattr(cfg.method, "validate", None)
    if validate_method is not None:
        p.extend(validate_method(cfg))
    if p:
        raise ConfigError(p)


def precision_record(cfg: Config) -> dict:
    """What a run computes in, for its record and summary: the training model's precision, and
    the averaged models' (always fp32, whatever the training precision)."""
    return {"training": cfg.run.precision, "averaged_models": "fp32"}


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (for run records and TensorBoard hparams)."""
    out = dataclasses.asdict(cfg)
    out["method"] = {"name": cfg.method.name, **dataclasses.asdict(cfg.method)}
    return out


# Keys that say where a run's files are, how it reports or when this invocation stops, but not
# what it computes: they are left out of a run's identity, so that a chained job
# (run.stop_after_epochs) or a moved data copy resumes the same run.
IDENTITY_NEUTRAL = ("run.out_dir", "run.name", "run.resume", "run.stop_after_epochs", "run.progress",
                    "data.root", "data.cache_dir", "data.num_workers")


def run_identity(cfg: Config) -> dict:
    """The resolved config as flat {dotted key: value}, minus IDENTITY_NEUTRAL: what makes two runs one run."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in IDENTITY_NEUTRAL}


def config_hash(cfg: Config, length: int = 8) -> str:
    """A short hash of `run_identity(cfg)` (overrides included), e.g. for default run directory names."""
    text = json.dumps(run_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and dicts-as-values become strings (hparams)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "kwargs":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
