"""The command line every experiment entry point shares.

    mpirun -np 4 python experiments/baselines.py --config configs/x.yaml optim.lr=0.05 run.seed=1

    python experiments/swalp_cifar.py --config configs/swalp/cifar10_vgg16_swalp_paper.yaml --dry-run

--dry-run prints what the config will do (swa_lib/dry_run.py) without loading data or training.
Exit codes: 0 done; 2 bad config, one that does not fit the launched world size, or a run
directory whose checkpoint another config or world size wrote (nothing was trained or
touched); 75 preempted by SIGTERM/SIGINT, checkpointed at a step all ranks agreed on: run
the same command again (swa_lib.loop.PREEMPTED_EXIT_CODE); 1 any failure during the run
(a message names it). Under mpirun a failing rank exits at once, without waiting on
its peers, and mpirun then stops the whole job instead of letting it hang.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from swa_lib.checkpoint import check_resumable
from swa_lib.config import config_hash, load_config, run_identity, validate_world
from swa_lib.errors import ConfigError
from swa_lib.preemption import PREEMPTED_EXIT_CODE, Preempted


def parse_args(argv, description: str):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config under configs/")
    parser.add_argument("--run-dir", help="run directory (default: run.out_dir/<config name>-s<seed>-<config "
                                          "hash>, the hash over the resolved config, overrides included)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, world layout, precision and the LR of every epoch; "
                             "load no data, train nothing, exit 0")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="--dry-run: plan for N processes (default: the launcher's, else the smallest "
                             "the method accepts)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 run.seed=1")
    return parser.parse_args(argv)


def default_run_dir(cfg, config_path: str | None) -> Path:
    """run.out_dir/run.name, or <config name>-s<seed>-<hash of the resolved config>: two sweeps
    that differ only in an override (optim.lr=0.05) get two directories, never one resumed by the other."""
    stem = Path(config_path).stem if config_path else "run"
    name = cfg.run.name or f"{stem}-s{cfg.run.seed}-{config_hash(cfg)}"
    return Path(cfg.run.out_dir) / name


def build_trainer(cfg, comm, run_dir: Path):
    """Everything a run needs, wired together: device, workload, logger, strategy, loop."""
    from swa_lib.loop import Trainer, pick_device
    from swa_lib.methods import build_strategy
    from swa_lib.run_log import RunLogger
    from swa_lib.workload import Workload

    workload = Workload(cfg, pick_device(cfg, comm))
    logger = RunLogger(run_dir, cfg, comm, enabled=comm.rank == 0)
    return Trainer(cfg, comm, workload, build_strategy(cfg), logger, run_dir)


def main(argv=None, description: str = "Train with weight averaging.", default_method: str = "sgd") -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, description)
    from swa_lib.workload import model_names  # the harness's models: known only to entry points

    try:
        cfg = load_config(args.config, args.overrides, default_method=default_method, model_names=model_names())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        print(f"error: --world-size {args.world_size}: only with --dry-run, and >= 1 (a real run takes "
              f"its size from the launcher)", file=sys.stderr)
        return 2
    if args.dry_run:
        from swa_lib.dry_run import dry_run

        return dry_run(cfg, args.world_size)
    comm = None
    try:
        from swa_lib.comm import init_comm

        comm = init_comm(cfg.dist.backend)
        # Checks that need the world size (e.g. a worker count must divide it): same verdict on every rank.
        problems = validate_world(cfg, comm.size)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg, args.config)
        if cfg.run.resume:  # before anything is written: a refused resume leaves the run directory alone
            problems += check_resumable(run_dir / "checkpoints", run_identity(cfg), comm.size)
        if problems:
            if comm.rank == 0:
                print(f"error: {ConfigError(problems)}", file=sys.stderr, flush=True)
            comm.shutdown()
            return 2
        trainer = build_trainer(cfg, comm, run_dir)
        summary = trainer.fit()
        trainer.logger.close()
        if "partial_world" in summary:
            # Peers are dead (SWAP's survivors): a world-wide shutdown would wait on them forever.
            print(f"rank {comm.rank}: {summary['partial_world']}", flush=True)
            os._exit(0)
        if "stopped_at_epoch" in summary:
            if comm.rank == 0:
                print(f"paused after epoch {summary['stopped_at_epoch']} (run.stop_after_epochs); "
                      f"run the same command again to continue from {run_dir}")
        elif comm.rank == 0:
            out = summary["output_name"]
            final = summary["final"]
            print(f"done: {out} test acc {final['output/acc']:.4f}, wall {final['wall_s']:.1f} s, "
                  f"run dir {run_dir} (tensorboard --logdir {run_dir.parent})")
        comm.shutdown()
        return 0
    except Preempted as stop:
        # Every rank agreed on the step and wrote its checkpoint, so the shutdown is collective.
        trainer.logger.close()
        if comm.rank == 0:
            print(f"preempted: {stop} (exit {PREEMPTED_EXIT_CODE})", file=sys.stderr, flush=True)
        if not trainer.strategy.isolated:
            comm.shutdown()
        return PREEMPTED_EXIT_CODE
    except Exception as err:  # the top level reports every failure the same way
        # A ConfigError here came from a check that needs the world size (e.g. HWA's groups
        # must divide it); it is raised before training, so it is a bad config too: exit 2.
        code = 2 if isinstance(err, ConfigError) else 1
        rank = comm.rank if comm is not None else int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))
        if os.environ.get("SWA_TRACEBACK"):
            traceback.print_exc()
        print(f"error (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if comm is not None and comm.size > 1:
            # Distributed: peers may be blocked in a collective; exit now, mpirun ends the job.
            sys.stdout.flush()
            os._exit(code)
        return code
