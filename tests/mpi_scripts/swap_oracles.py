"""Per-rank program: SWAP's three phases under mpirun, against oracles computed on every rank.

Usage: swap_oracles.py MODE RUN_DIR
  phases  (4 ranks) two runs, K=2 workers of 2 processes (phase 1 stopped by accuracy) and
          K=4 workers of 1 (stopped at the epoch cap); then a run paused inside phase 2 and
          resumed, which must end bitwise equal to the uninterrupted K=2 run.
  kill    (4 ranks, K=4) rank 2 SIGKILLs itself inside phase 2; the job must end non-zero.
  resume  (4 ranks, K=4) the same command again: resumes from the last checkpoint and finishes.
  survivors-kill / survivors-nan / survivors-all  (4 ranks, K=4, on_worker_failure=average_survivors)
          with rank 2 killed in phase 2, with rank 2's loss turning NaN in phase 2, and without either.
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from rank_harness import check, run_rank
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config
from swa_lib.methods.base import DataShard

BN_BATCHES = 2


def overrides(workers: int, stop_accuracy, *extra) -> list[str]:
    return ["data.dataset=cifar10_jpg", "data.train_subset=256", "data.test_subset=200", "model.name=resnet9",
            "model.kwargs={width: 4}", "optim.batch_size=16", "optim.lr=0.05", "schedule.epochs=4",
            "schedule.kind=linear", "eval.batch_size=100", f"eval.bn_update_batches={BN_BATCHES}",
            "run.progress=false", "run.channels_last=false", f"method.workers={workers}",
            f"method.stop_accuracy={stop_accuracy}", "method.phase2_epochs=2", "method.phase2_batch_size=8",
            "method.phase2_lr=0.02", *extra]


def flat(model, params_only=True) -> torch.Tensor:
    tensors = list(model.parameters()) if params_only else list(model.state_dict().values())
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def check_phases(comm, trainer, summary, workers: int, rule: str, end_epoch: int) -> None:
    strategy, rank = trainer.strategy, comm.rank
    check(strategy.phase == "phase3", f"ended in {strategy.phase}, not phase3")
    check(strategy.phase1_end["rule"] == rule and strategy.phase1_end["epoch"] == end_epoch,
          f"phase 1 ended {strategy.phase1_end}, expected rule {rule} at epoch {end_epoch}")
    check(summary["epochs"] == end_epoch + 2, f"ran {summary['epochs']} epochs, expected {end_epoch} + 2 in phase 2")
    group = strategy.group
    check(group.size == comm.size // workers and group.index == rank // group.size, f"group {group}")

    # Workers: identical inside a worker, different across workers (nothing crossed between them).
    mine = flat(trainer.ctx.model)
    gathered = comm.allgather_object((group.index, mine))
    for index, weights in gathered:
        same = torch.equal(weights, mine)
        if index == group.index:
            check(same, f"rank {rank}: a member of worker {index} holds other weights than mine")
        else:
            check(not same, f"rank {rank}: worker {index} holds my weights, so the workers were not independent")

    # Phase 3: the average is the mean over workers (one replica each) ...
    per_worker = {index: w for index, w in gathered}
    mean = torch.stack([per_worker[k] for k in sorted(per_worker)]).mean(0)
    err = (flat(strategy.average) - mean).abs().max().item()
    check(err < 1e-6, f"SWAP average differs from the mean of the {workers} workers by {err}")
    # ... and its BN statistics equal one update_bn over every process's BN batches.
    reference = trainer.workload.build_model()
    reference.load_state_dict(strategy.average.state_dict())
    batches = []
    for r in range(comm.size):
        shard = DataShard(r, comm.size, trainer.cfg.run.seed, trainer.cfg.optim.batch_size)
        loader = trainer.workload.train_loader(shard)
        loader.set_epoch(trainer.ctx.epoch - 1)
        batches += [x for _, (x, _) in zip(range(BN_BATCHES), loader)]
    update_bn(batches, reference)
    for (name, a), b in zip(strategy.average.state_dict().items(), reference.state_dict().values(), strict=True):
        if "running" in name:
            check(torch.allclose(a, b, rtol=1e-4, atol=1e-5),
                  f"BN {name} of the average: over ranks {a} vs one pass {b}")

    final = summary["final"]
    for k in range(workers):
        check(f"group{k}/model/acc" in final and f"group{k}/swap/acc" in final,
              f"worker {k} missing in {sorted(final)}")
    check(final["output/acc"] == final["swap/acc"], "the output is not the SWAP average")
    if rank == 0:
        tags = sorted(p.name for p in trainer.checkpoints.directory.iterdir() if (p / "PINNED").exists())
        check(tags == [f"e{end_epoch:04d}-phase2", f"e{end_epoch + 2:04d}-phase3"], f"pinned phase checkpoints {tags}")


def phases(run_dir: Path) -> None:
    comm = init_comm("horovod")
    a = build_trainer(load_config(None, overrides(2, 1.0), default_method="swap"), comm, run_dir / "k2")
    check_phases(comm, a, a.fit(), workers=2, rule="stop_accuracy", end_epoch=1)
    b = build_trainer(load_config(None, overrides(4, "null"), default_method="swap"), comm, run_dir / "k4")
    check_phases(comm, b, b.fit(), workers=4, rule="epoch_cap", end_epoch=2)

    paused = build_trainer(load_config(None, overrides(2, 1.0, "run.stop_after_epochs=2"), default_method="swap"),
                           comm, run_dir / "k2-resumed")
    check("stopped_at_epoch" in paused.fit() and paused.strategy.phase == "phase2", "the pause did not land in phase 2")
    resumed = build_trainer(load_config(None, overrides(2, 1.0), default_method="swap"), comm, run_dir / "k2-resumed")
    resumed.fit()
    check(torch.equal(flat(resumed.strategy.average, False), flat(a.strategy.average, False)),
          "a run paused in phase 2 and resumed does not end bitwise equal to the uninterrupted run")
    comm.barrier()
    print(f"SWAP_PHASES_OK rank={comm.rank}", flush=True)
    comm.shutdown()


def killed_or_resumed(run_dir: Path, kill: bool, *extra: str, nan: bool = False) -> None:
    comm = init_comm("horovod")
    trainer = build_trainer(load_config(None, overrides(4, "null", *extra), default_method="swap"), comm, run_dir)
    if kill and comm.rank == 2:
        after_step = trainer.strategy.after_step

        def die_in_phase2(step):
            after_step(step)
            if trainer.strategy.phase == "phase2" and step >= trainer.strategy.phase2_start * 4 + 3:
                os.kill(os.getpid(), signal.SIGKILL)  # a worker lost in the middle of phase 2

        trainer.strategy.after_step = die_in_phase2
    if nan and comm.rank == 2:
        loss_fn = trainer.workload.loss_fn

        def nan_in_phase2(out, y):  # a worker whose training diverges in phase 2
            loss = loss_fn(out, y)
            return loss * float("nan") if trainer.strategy.phase == "phase2" else loss

        trainer.workload.loss_fn = nan_in_phase2
    summary = trainer.fit()
    if "partial_world" in summary:  # as swa_lib.cli does: a survivor leaves without world shutdown
        print(f"rank {comm.rank}: {summary['partial_world']}", flush=True)
        os._exit(0)
    check(summary["epochs"] == 4 and trainer.strategy.phase == "phase3", f"resumed run ended at {summary['epochs']}")
    if comm.rank == 0:
        print("SWAP_RESUMED " + json.dumps({"acc": summary["final"]["output/acc"]}), flush=True)
    comm.barrier()
    print(f"SWAP_RESUME_OK rank={comm.rank}", flush=True)
    comm.shutdown()


def main() -> None:
    mode, run_dir = sys.argv[1], Path(sys.argv[2])
    survive = ["method.on_worker_failure=average_survivors", "method.survivor_wait_s=20"]
    if mode == "phases":
        phases(run_dir)
    elif mode.startswith("survivors"):  # survivors-kill | survivors-all
        killed_or_resumed(run_dir, mode.endswith("kill"), *survive, nan=mode.endswith("nan"))
    else:
        killed_or_resumed(run_dir, kill=mode == "kill")


if __name__ == "__main__":
    run_rank(main)
