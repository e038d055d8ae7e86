"""--dry-run: what a config will do, printed before any data is loaded or GPU hour spent.

    python experiments/swalp_cifar.py --config configs/swalp/cifar10_vgg16_swalp_paper.yaml --dry-run
    python experiments/swap_cifar.py --config configs/swap/cifar10_resnet9_swap_paper.yaml --dry-run --world-size 8

Prints the resolved config, the world layout (processes, workers, groups), the precision, and
one line `epoch <e> lr <value> (<phase>)` per epoch: the LR at the start of 0-based epoch e,
as the official scripts set it. The LR comes from the strategy's own `lr`, prepared by
`Strategy.plan` with the functions the training loop uses, so a method's takeover (SWA and
SWALP from swa_start, SWAP phase 2) and any change to swa_lib/schedules.py show up here as
they will in training. A phase that ends on a metric (SWAP's stop_accuracy) is planned at its
epoch cap.
"""
from __future__ import annotations

import sys

import yaml

from swa_lib.comm import detect_launch
from swa_lib.config import Config, precision_record, to_dict, validate_world
from swa_lib.errors import ConfigError
from swa_lib.methods import build_strategy

MAX_PLANNED_WORLD = 4096


def planned_world_size(cfg: Config, asked: int | None) -> tuple[int, str]:
    """The world size to plan for, and where it came from: --world-size, the launcher, or the
    smallest size the method accepts (e.g. one process per SWAP worker)."""
    if asked is not None:
        return asked, "--world-size"
    launched = detect_launch().size
    if launched:
        return launched, "launcher"
    smallest = next((n for n in range(1, MAX_PLANNED_WORLD + 1) if not validate_world(cfg, n)), 1)
    return smallest, "the smallest the method accepts; --world-size N plans another"


def plan_lines(cfg: Config, world_size: int, source: str = "--world-size") -> list[str]:
    """The dry-run report for `world_size` processes. Raises ConfigError if they do not fit the method."""
    problems = validate_world(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    strategy = build_strategy(cfg)
    strategy.plan(world_size)
    precision = precision_record(cfg)
    config = yaml.safe_dump(to_dict(cfg), sort_keys=False).splitlines()
    return ["resolved config:", *("  " + line for line in config),
            f"world: {world_size} process(es) ({source}), method {cfg.method.name}",
            *("  " + line for line in strategy.layout(world_size)),
            f"precision: training {precision['training']}, averaged models {precision['averaged_models']}",
            f"schedule: {cfg.schedule.epochs} epochs; LR at the start of each epoch:",
            *(f"epoch {e} lr {strategy.lr(e):.6g} ({strategy.planned_phase(e)})" for e in range(cfg.schedule.epochs))]


def dry_run(cfg: Config, world_size: int | None = None) -> int:
    """Print the plan on rank 0 (other ranks of a launched job stay quiet). Returns the exit
    code: 0, or 2 for a world size that does not fit the method."""
    size, source = planned_world_size(cfg, world_size)
    rank0 = not detect_launch().rank
    try:
        lines = plan_lines(cfg, size, source)
    except ConfigError as err:
        if rank0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if rank0:
        print("\n".join(lines), flush=True)
    return 0
