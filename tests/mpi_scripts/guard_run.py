"""One short fixed-seed CPU run of a method; writes a fingerprint of its final weights (rank 0).

Usage: guard_run.py METHOD OUT_JSON   (swap and hwa under mpirun with 2 processes, the rest alone)

Used by tests/test_refactor_guard.py to show that a refactor leaves the numbers alone. The run
is a handful of optimizer steps, so a machine with other float kernels lands within a tight
tolerance of the recorded weights (the chaotic growth of rounding differences needs many steps).
"""
import json
import sys
from pathlib import Path

import torch

import tiny_models  # noqa: F401 - registers the tiny test models
from guard_digest import digest
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config
from swa_lib.run_log import numerics_record

# 96 images / batch 16 = 6 steps per epoch (3 per process with 2 processes), 3 epochs.
COMMON = ["data.dataset=cifar10_jpg", "data.train_subset=96", "data.test_subset=50", "model.name=tiny_cnn_bn",
          "optim.batch_size=16", "optim.lr=0.05", "schedule.epochs=3", "eval.batch_size=50",
          "eval.bn_update_batches=2", "eval.every_epochs=3", "run.progress=false", "run.seed=3",
          "run.channels_last=false", "run.checkpoint_every_epochs=0"]
METHODS = {
    "sgd": (["method.name=sgd"], "single"),
    "swa": (["method.name=swa", "method.swa_start_epoch=1", "method.swa_lr=0.02"], "single"),
    "swalp": (["method.name=swalp", "method.swa_start_epoch=1", "method.swa_lr=0.02"], "single"),
    "lawa": (["method.name=lawa", "method.every_steps=2", "method.window=3"], "single"),
    "ema": (["method.name=ema", "method.every_steps=2", "method.decay=0.8"], "single"),
    "lawa_recompute": (["method.name=lawa", "method.every_steps=2", "method.window=3", "method.bn=recompute"],
                       "single"),
    "swap": (["method.name=swap", "method.workers=2", "method.phase2_epochs=1", "method.phase2_batch_size=8",
              "method.phase2_lr=0.02"], "torch"),
    "hwa": (["method.name=hwa", "method.groups=2", "method.sync_period_steps=2", "method.window_cycles=2"],
            "torch"),
}


def main(method: str, out: Path) -> None:
    torch.set_num_threads(1)  # part of the numerics fingerprint: one thread everywhere
    extra, backend = METHODS[method]
    cfg = load_config(None, COMMON + extra + [f"dist.backend={backend}"])
    comm = init_comm(cfg.dist.backend)
    trainer = build_trainer(cfg, comm, out.parent / f"run-{method}")
    summary = trainer.fit()
    trainer.logger.close()
    targets = trainer._last_targets
    record = {"method": method, "steps": trainer.ctx.step,
              "output_acc": summary["final"]["output/acc"],
              "weights": {name: digest(model.state_dict()) for name, model in sorted(targets.items())}}
    if comm.rank == 0:
        record["numerics"] = numerics_record()
        out.write_text(json.dumps(record, indent=1, sort_keys=True))
    comm.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
