"""The sections of a run configuration as typed dataclasses, and the typed reading of a mapping.

A leaf: it imports nothing of swa_lib, so the methods (whose own config dataclasses are read
with `from_dict`) and the LR schedules can import it at the top, and swa_lib.config, which
needs the method registry, can import them in turn. Every section's defaults are commented
here; `swa_lib.config` merges files and overrides, validates, and re-exports these names.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    dataset: str = "cifar10_jpg"  # cifar10 | cifar10_jpg | cifar100 | tiny_imagenet | imagenet
    root: str = "../shared/data"  # relative paths are taken from the repo root; env SWA_DATA_ROOT wins
    cache_dir: str | None = None  # decoded uint8 arrays live here; None: env SWA_DATA_CACHE, else ~/.cache/swa_lib/data
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


def _check_type(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Coerce `value` to the annotated type where lossless (int -> float), else report."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(types, "UnionType", ())):
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
