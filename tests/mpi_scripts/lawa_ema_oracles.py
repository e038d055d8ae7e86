"""Per-rank program: LAWA and EMA under data-parallel training (horovod).

Mode `oracle` (2 ranks):
1. Every rank ends with bitwise the same averages (a BN-free model: the ranks hold the same
   training model, and the averages only read it).
2. Those averages equal the ones of a single process trained with the global batch on
   the same samples (BN-free, so per-rank batch statistics cannot differ).
Mode `bn` (2 or 4 ranks): a model with batch norm and `bn: average`, so the averages hold BN
   running statistics, which each rank computes from its own batches. For LAWA and EMA:
   every rank's average is bitwise equal to every other rank's, and final_model.pt (written
   by rank 0) holds exactly that average.
Usage: lawa_ema_oracles.py MODE RUN_DIR
"""
import sys
from pathlib import Path

import torch

import tiny_models  # noqa: F401 - registers the tiny test models
from rank_harness import check, run_rank
from swa_lib.averaging import averaged_tensors
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config

GLOBAL_BATCH = 64



def overrides(batch: int, backend: str) -> list[str]:
    return ["data.dataset=cifar10_jpg", "data.train_subset=384", "data.test_subset=200",
            "model.name=tiny_cnn_no_bn", f"optim.batch_size={batch}", "optim.lr=0.05", "schedule.epochs=2",
            "eval.batch_size=100", "run.progress=false", f"dist.backend={backend}", "method.name=averages",
            "method.lawa=[{every_steps: 2, window: 3}]", "method.ema=[{every_steps: 1, decay: 0.9}]"]


def same_on_every_rank(comm, mine: dict) -> None:
    for rank, theirs in enumerate(comm.allgather_object(mine)):  # Distributed: compare with every rank
        for name, tensor in theirs.items():
            check(torch.equal(tensor, mine[name]), f"{name} on rank {rank} differs from rank {comm.rank}")


def bn_averages(comm, run_dir: Path) -> None:
    common = [o for o in overrides(GLOBAL_BATCH // comm.size, "horovod") if not o.startswith(("model.", "method."))]
    for name, keys in (("lawa", ["method.every_steps=2", "method.window=3"]),
                       ("ema", ["method.every_steps=1", "method.decay=0.9"])):
        cfg = load_config(None, common + ["model.name=tiny_cnn_bn", f"method.name={name}", "method.bn=average", *keys])
        trainer = build_trainer(cfg, comm, run_dir / name)
        summary = trainer.fit()
        check(summary["output_name"] == name, f"the output is {summary['output_name']}, not the {name} average")
        average = trainer.strategy.averages[name].average()
        n_params = sum(p.numel() for p in trainer.ctx.model.parameters())
        check(average.numel() > n_params, "the average holds no BN buffers; the test would prove nothing")
        same_on_every_rank(comm, {name: average})
        comm.barrier()  # rank 0 has written final_model.pt
        saved = trainer.workload.build_model()
        saved.load_state_dict(torch.load(run_dir / name / "final_model.pt", weights_only=True))
        check(torch.equal(torch.cat([t.reshape(-1) for t in averaged_tensors(saved, True)]), average),
              f"final_model.pt is not the {name} average this rank holds")
    print(f"LAWA_EMA_BN_OK rank={comm.rank}", flush=True)


def main():
    mode, run_dir = sys.argv[1], Path(sys.argv[2])
    comm = init_comm("horovod")
    if mode == "bn":
        bn_averages(comm, run_dir)
        comm.shutdown()
        return
    dp = build_trainer(load_config(None, overrides(GLOBAL_BATCH // comm.size, "horovod")), comm, run_dir / "dp")
    dp.fit()
    mine = {name: a.average().clone() for name, a in dp.strategy.averages.items()}
    check(set(mine) == {"lawa_nu2_L3", "ema_nu1_b0.9"}, f"averages {sorted(mine)}")
    same_on_every_rank(comm, mine)
    ref = build_trainer(load_config(None, overrides(GLOBAL_BATCH, "single")), init_comm("single"),
                        run_dir / f"ref{comm.rank}")
    ref.fit()
    for name, average in ref.strategy.averages.items():
        err = (average.average() - mine[name]).abs().max().item()
        check(err < 1e-5, f"{name}: data-parallel average differs from 1 process with the global batch by {err}")
    print(f"LAWA_EMA_OK rank={comm.rank}", flush=True)


if __name__ == "__main__":
    run_rank(main)
