"""SWAP's phase 3 without the world: `on_worker_failure: average_survivors` (swa_lib.methods.swap).

Workers are single processes here. Each one writes its final phase-2 weights to
run_dir/phase2/worker{k}.pt and waits up to `survivor_wait_s` for the others' files. With all
K there, phase 3 runs as usual over the world. With some missing, the lowest surviving worker
averages the files that exist, recomputes BN alone over as many training images as the whole
world would have used, evaluates, and writes final_model.pt and survivors.json; the others
wait for that report. Every survivor then ends its run with the message `average_survivors`
returns (Strategy.partial_result), and the entry point exits 0 without the world-wide
shutdown that would wait on the dead.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from swa_lib.averaging import evaluate, recompute_bn_
from swa_lib.checkpoint import atomic_torch_save, atomic_write_text
from swa_lib.methods.base import DataShard


def worker_file(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / "phase2" / f"worker{index}.pt"


def write_worker_result(run_dir: Path, index: int, model: torch.nn.Module) -> None:
    """This worker's phase-2 weights on disk, so that the others can average without it."""
    worker_file(run_dir, index).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.state_dict(), worker_file(run_dir, index))


def wait_for_workers(run_dir: Path, workers: int, wait_s: float) -> list[int]:
    """The workers whose weights are on disk, once all are or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        present = [k for k in range(workers) if worker_file(run_dir, k).exists()]
        if len(present) == workers or time.monotonic() > deadline:
            return present
        time.sleep(0.5)


def average_survivors(ctx, cfg, me: int, present: list[int]) -> tuple[str, torch.nn.Module | None]:
    """Average the surviving workers' weights (on the lowest survivor), or wait for that (the others).

    Returns the message that ends this process's run, and the average (None on all but the leader)."""
    m = cfg.method
    lost = sorted(set(range(m.workers)) - set(present))
    report = ctx.run_dir / "survivors.json"
    if me != min(present):
        # Stay until the leader is done: Open MPI ends the job (leader included) as soon as one
        # process exits without MPI_Finalize, which a survivor must skip (its peers are dead).
        deadline = time.monotonic() + max(m.survivor_wait_s, 600.0)
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return (f"workers {lost} did not finish phase 2; worker {min(present)} averaged the "
                f"{len(present)} survivors into {report.parent}"), None
    average = copy.deepcopy(ctx.model)
    states = [torch.load(worker_file(ctx.run_dir, k), map_location=ctx.device) for k in present]
    with torch.no_grad():
        for name, p in average.named_parameters():
            p.copy_(torch.stack([s[name].float() for s in states]).mean(0).to(p.dtype))
    # Alone now: the same number of BN images as the whole world would have used.
    batches = cfg.eval.bn_update_batches
    recompute_bn_(average, ctx.workload, DataShard(0, 1, cfg.run.seed, cfg.optim.batch_size), ctx.epoch - 1,
                  max_batches=None if batches is None else batches * ctx.comm.size, device=ctx.device)
    acc = evaluate(average, ctx.workload.test_loader(0, 1), ctx.device)["acc"]
    result = {"averaged_workers": present, "lost_workers": lost, "epoch": ctx.epoch, "test_acc": acc}
    atomic_torch_save(average.state_dict(), ctx.run_dir / "final_model.pt")
    ctx.logger.scalars({"eval/swap_survivors/acc": acc}, ctx.step, epoch=ctx.epoch)
    # Flushed and closed before the report: once the others see it they leave, and mpirun may end us.
    ctx.logger.close()
    message = (f"workers {lost} did not finish phase 2; averaged the {len(present)} survivors {present}: "
               f"test acc {acc:.4f}; wrote {ctx.run_dir / 'final_model.pt'} and {report}")
    print(message, flush=True)
    atomic_write_text(json.dumps(result, indent=2), report)  # last: it releases the other survivors
    return message, average
