"""Per-rank program: LAWA and EMA under data-parallel training (horovod, 2 ranks).

1. Every rank ends with bitwise the same averages (no communication is needed for that:
   the ranks hold the same training model, and the averages only read it).
2. Those averages equal the ones of a single process trained with the global batch on
   the same samples (a BN-free model, so per-rank batch statistics cannot differ).
Usage: lawa_ema_oracles.py RUN_DIR
"""
import sys
from pathlib import Path

import torch

import tiny_models  # noqa: F401 - registers the tiny test models
from rank_harness import check, run_rank

from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config

GLOBAL_BATCH = 64



def overrides(batch: int, backend: str) -> list[str]:
    return ["data.dataset=cifar10_jpg", "data.train_subset=384", "data.test_subset=200",
            "model.name=tiny_cnn_no_bn", f"optim.batch_size={batch}", "optim.lr=0.05", "schedule.epochs=2",
            "eval.batch_size=100", "run.progress=false", f"dist.backend={backend}", "method.name=averages",
            "method.lawa=[{every_steps: 2, window: 3}]", "method.ema=[{every_steps: 1, decay: 0.9}]"]


def main():
    run_dir = Path(sys.argv[1])
    comm = init_comm("horovod")
    dp = build_trainer(load_config(None, overrides(GLOBAL_BATCH // comm.size, "horovod")), comm, run_dir / "dp")
    dp.fit()
    mine = {name: a.average().clone() for name, a in dp.strategy.averages.items()}
    check(set(mine) == {"lawa_nu2_L3", "ema_nu1_b0.9"}, f"averages {sorted(mine)}")
    for rank, theirs in enumerate(comm.allgather_object(mine)):  # Distributed: compare with every rank
        for name, tensor in theirs.items():
            check(torch.equal(tensor, mine[name]), f"{name} on rank {rank} differs from rank {comm.rank}")
    ref = build_trainer(load_config(None, overrides(GLOBAL_BATCH, "single")), init_comm("single"),
                        run_dir / f"ref{comm.rank}")
    ref.fit()
    for name, average in ref.strategy.averages.items():
        err = (average.average() - mine[name]).abs().max().item()
        check(err < 1e-5, f"{name}: data-parallel average differs from 1 process with the global batch by {err}")
    print(f"LAWA_EMA_OK rank={comm.rank}", flush=True)


if __name__ == "__main__":
    run_rank(main)
