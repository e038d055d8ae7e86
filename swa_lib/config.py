"""Typed, validated run configuration: YAML file + dotted command-line overrides.

A config is a tree of dataclasses (swa_lib.sections, re-exported here). Every field has a
default and a comment saying what it means; `validate` checks the invariants after merging, and collects every
problem at once so a user fixes their file in one go. Library functions never read a
global config: the entry point resolves it and passes the pieces down.

The ``method`` section is open: its ``name`` picks a strategy, and the strategy's own
dataclass (registered in ``swa_lib.methods``) types and validates the other keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import yaml

from swa_lib.errors import ConfigError
from swa_lib.methods import method_config_class
from swa_lib.sections import (
    AUGMENTS,
    BACKENDS,
    DATASETS,
    DEVICES,
    LR_UPDATES,
    PRECISIONS,
    SCHEDULES,
    Config,
    DataConfig,
    DistConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    from_dict,
)

# Re-exported: the sections and ConfigError have always been importable from here.
__all__ = ["ConfigError", "Config", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "EvalConfig",
           "DistConfig", "RunConfig", "SCHEDULES", "from_dict", "apply_overrides", "load_config", "validate",
           "validate_world", "precision_record", "to_dict", "run_identity", "config_hash", "flatten",
           "IDENTITY_NEUTRAL"]


# --------------------------------------------------------------------------- loading

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
    method_raw = raw.pop("method", None)
    if method_raw is not None and not isinstance(method_raw, dict):
        problems.append(f"method: expected a mapping such as {{name: sgd}}, got {method_raw!r} "
                        f"(on the command line the method is chosen with method.name=...)")
        method_raw = None
    method_raw = dict(method_raw or {})
    method_name = method_raw.pop("name", default_method)
    cfg = from_dict(Config, raw, "", problems)
    if not isinstance(method_name, str):
        problems.append(f"method.name: expected a method's name, got {method_name!r}")
    else:
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


def validate_world(cfg: Config, world_size: int) -> list[str]:
    """What keeps `cfg` from running on `world_size` processes (e.g. SWAP's workers must divide it).

    The one world-size check: the entry point asks it of the launched world, the loop of its
    communicator (for direct users), and --dry-run of --world-size N. A method's config takes
    part by defining `validate_world(world_size) -> list[str]`."""
    check = getattr(cfg.method, "validate_world", None)
    return [] if check is None else check(world_size)
