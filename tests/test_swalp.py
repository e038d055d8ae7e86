"""The SWALP strategy in the one loop, on a small subset of real CIFAR-10."""
from pathlib import Path

import pytest
import torch

import models
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import ConfigError, load_config
from swa_lib.quant import quantize

TINY = ["data.dataset=cifar10_jpg", "data.train_subset=192", "data.test_subset=100", "model.name=resnet9",
        "model.kwargs={width: 8}", "optim.batch_size=32", "optim.lr=0.05", "schedule.epochs=2",
        "eval.batch_size=100", "eval.bn_update_batches=2", "run.progress=false", "method.swa_start_epoch=1",
        "method.swa_lr=0.02"]
FP32 = [f"method.{k}_bits=null" for k in ("weight", "grad", "momentum", "acc", "act", "err")]


def run(tmp_path, name, *extra):
    trainer = build_trainer(load_config(None, TINY + list(extra)), init_comm("single"), tmp_path / name)
    return trainer, trainer.fit()


def test_swalp_with_every_format_off_is_classic_swa_bit_for_bit(tmp_path):
    swa, swa_summary = run(tmp_path, "swa", "method.name=swa")
    swalp, swalp_summary = run(tmp_path, "swalp", "method.name=swalp", *FP32)
    for a, b in zip(swa.ctx.model.state_dict().values(), swalp.ctx.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(swa.strategy.average.parameters(), swalp.strategy.average.parameters()):
        assert torch.equal(a, b)
    assert swa_summary["final"]["output/acc"] == swalp_summary["final"]["output/acc"]


@pytest.mark.parametrize("fused", ["false", "true"])
def test_8bit_training_weights_are_on_the_grid_and_the_average_is_full_precision(tmp_path, fused):
    trainer, summary = run(tmp_path, "lp", "method.name=swalp", f"method.fused={fused}")
    assert trainer.ctx.optimizer.fused == (fused == "true")
    fmt = trainer.cfg.method.format("weight")
    for name, p in trainer.ctx.model.named_parameters():
        assert torch.equal(quantize(p.detach(), fmt), p.detach()), f"{name} is off the 8-bit grid"
    # The average computes exactly like a plain fp32 model with the same weights (no quantizers left).
    average = trainer.strategy.average.module.eval()
    plain = models.build_model("resnet9", 10, width=8).to(memory_format=torch.channels_last)
    plain.load_state_dict(average.state_dict())
    x = next(iter(trainer.workload.test_loader(0, 1)))[0]
    with torch.no_grad():
        assert torch.equal(average(x), plain.eval()(x))
    off_grid = [p for p in average.parameters() if p.dim() > 1 and not torch.equal(quantize(p.detach(), fmt), p)]
    assert off_grid, "the average of 8-bit weights should not itself be 8-bit"
    assert summary["output_name"] == "swa"


def test_average_false_is_low_precision_sgd(tmp_path):
    trainer, summary = run(tmp_path, "sgd8", "method.name=swalp", "method.average=false")
    assert summary["output_name"] == "model" and "swa/acc" not in summary["final"]
    assert trainer.strategy.average.n_averaged.item() == 0


@pytest.mark.parametrize("override, field", [("method.act_bits=1", "method.act_bits"),
                                             ("method.err_block=medium", "method.err_block"),
                                             ("method.rounding=up", "method.rounding")])
def test_bad_swalp_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["method.name=swalp", override])


@pytest.mark.timeout(300)
def test_data_parallel_swalp_replicas_stay_identical_on_the_grid_under_mpirun(tmp_path):
    from mpi_util import assert_ranks_said, run_mpi

    script = Path(__file__).parent / "mpi_scripts" / "swalp_dp.py"
    assert_ranks_said(run_mpi(2, script, [tmp_path], timeout_s=280), 2, "SWALP_DP_OK")
