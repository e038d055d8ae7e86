"""Per-rank program: SWALP data-parallel under mpirun (Horovod).

Gradients are averaged in fp32 by the loop, then QuantizedSGD quantizes the averaged
gradient, momentum, accumulator and weights with a generator seeded alike on every rank.
So the replicas must stay bitwise identical, on the 8-bit grid, and their fp32 averages too.
Usage: swalp_dp.py RUN_DIR
"""
import sys
from pathlib import Path

import torch

from rank_harness import check, run_rank
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config
from swa_lib.quant import quantize


def main():
    comm = init_comm("horovod")
    cfg = load_config(None, ["data.dataset=cifar10_jpg", "data.train_subset=256", "data.test_subset=200",
                             "model.name=resnet9", "model.kwargs={width: 4}", "optim.batch_size=16",
                             "optim.lr=0.05", "schedule.epochs=2", "eval.batch_size=100", "eval.bn_update_batches=2",
                             "run.progress=false", "method.swa_start_epoch=1", "method.swa_lr=0.02"],
                      default_method="swalp")
    trainer = build_trainer(cfg, comm, Path(sys.argv[1]))
    summary = trainer.fit()
    fmt = cfg.method.format("weight")
    mine = torch.cat([p.detach().reshape(-1) for p in trainer.ctx.model.parameters()])
    average = torch.cat([p.detach().reshape(-1) for p in trainer.strategy.average.parameters()])
    for name, p in trainer.ctx.model.named_parameters():
        check(torch.equal(quantize(p.detach(), fmt), p.detach()), f"{name} is off the 8-bit grid")
    for other_weights, other_average in comm.allgather_object((mine, average)):
        check(torch.equal(other_weights, mine), "data-parallel SWALP replicas diverged")
        check(torch.equal(other_average, average), "the fp32 averages differ between ranks")
    check(summary["output_name"] == "swa" and 0 < summary["final"]["swa/acc"] <= 1, f"summary {summary['final']}")
    comm.barrier()
    print(f"SWALP_DP_OK rank={comm.rank}", flush=True)
    comm.shutdown()


if __name__ == "__main__":
    run_rank(main)
