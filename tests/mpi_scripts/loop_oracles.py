"""Per-rank program: the training loop under mpirun against single-process oracles.

1. N ranks training data-parallel (per-rank batch B/N) end with the same weights and test
   accuracy as one process with batch B on the same samples (a BN-free model, so that
   per-rank batch statistics cannot differ).
2. BN recompute combined over the ranks equals one process's update_bn over all batches.
Usage: loop_oracles.py BACKEND RUN_DIR
"""
import sys
from pathlib import Path

import torch
from torch import nn

import tiny_models  # noqa: F401 - registers the tiny test models
from rank_harness import check, run_rank
from swa_lib.averaging import update_bn_
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config

GLOBAL_BATCH = 64



def overrides(batch: int, backend: str) -> list[str]:
    return ["data.dataset=cifar10_jpg", "data.train_subset=384", "data.test_subset=300", "model.name=tiny_cnn_no_bn",
            f"optim.batch_size={batch}", "optim.lr=0.05", "optim.weight_decay=5e-4", "schedule.epochs=2",
            "schedule.kind=cosine", "eval.batch_size=100", "run.progress=false", f"dist.backend={backend}",
            "run.checkpoint_every_epochs=1"]


def main():
    backend, run_dir = sys.argv[1], Path(sys.argv[2])
    comm = init_comm(backend)
    size, rank = comm.size, comm.rank
    check(comm.backend == backend, f"asked for {backend}, got {comm.backend}")

    dp = build_trainer(load_config(None, overrides(GLOBAL_BATCH // size, backend)), comm, run_dir / "dp")
    dp_summary = dp.fit()
    ref = build_trainer(load_config(None, overrides(GLOBAL_BATCH, "single")), init_comm("single"),
                        run_dir / f"ref{rank}")
    ref_summary = ref.fit()
    check(dp.ctx.step == ref.ctx.step, f"steps {dp.ctx.step} vs reference {ref.ctx.step}")
    for (name, a), b in zip(dp.ctx.model.state_dict().items(), ref.ctx.model.state_dict().values(), strict=True):
        err = (a - b).abs().max().item()
        check(err < 1e-5, f"{name}: data-parallel differs from 1 process with {size}x batch by {err}")
    acc_dp, acc_ref = dp_summary["final"]["model/acc"], ref_summary["final"]["model/acc"]
    check(abs(acc_dp - acc_ref) < 1e-9, f"test acc {acc_dp} (sharded over {size} ranks) vs {acc_ref}")

    torch.manual_seed(123)  # every rank draws every batch, so each knows the oracle
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batches = [torch.randn(8, 3, 6, 6) for _ in range(2 * size)]
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    reference.load_state_dict(bn_model.state_dict())
    update_bn_(reference, batches)
    update_bn_(bn_model, batches[rank::size], comm=comm)
    for name in ("running_mean", "running_var"):
        a, b = getattr(bn_model[1], name), getattr(reference[1], name)
        check(torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"BN {name} over ranks {a} vs one process {b}")
    comm.barrier()
    print(f"LOOP_ORACLES_OK rank={rank} acc={acc_dp:.4f}", flush=True)
    comm.shutdown()


if __name__ == "__main__":
    run_rank(main)
