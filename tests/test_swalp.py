"""The SWALP strategy in the one loop, on a small subset of real CIFAR-10."""
import copy
from pathlib import Path

import pytest
import torch

import models
from swa_lib.averaging import evaluate, update_bn_
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
    for a, b in zip(swa.ctx.model.state_dict().values(), swalp.ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(swa.strategy.average.parameters(), swalp.strategy.average.parameters(), strict=True):
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


SWA_START = ["schedule.epochs=3", "method.swa_start_epoch=2"]


def test_swa_start_model_is_the_run_stopped_at_swa_start_then_bn_updated(tmp_path):
    # Nearest rounding: the BN update and the evaluation of the oracle are deterministic.
    same = ["method.name=swalp", "method.rounding=nearest", *SWA_START]
    full, summary = run(tmp_path, "full", *same)
    stopped, paused = run(tmp_path, "stopped", *same, "run.stop_after_epochs=2")
    assert paused["stopped_at_epoch"] == 2
    # Oracle: the stopped run's low-precision model, BN statistics recomputed by hand on the
    # training batches of its last epoch (eval.bn_update_batches of them).
    oracle = copy.deepcopy(stopped.ctx.model)
    loader = stopped.workload.train_loader(stopped.strategy.data_shard(1))
    loader.set_epoch(1)
    update_bn_(oracle, loader, max_batches=2)
    kept = full.strategy.swa_start_model.state_dict()
    assert kept.keys() == oracle.state_dict().keys()
    for name, value in oracle.state_dict().items():
        assert torch.equal(kept[name], value), name
    assert not torch.equal(kept["features.0.1.running_mean"], full.ctx.model.state_dict()["features.0.1.running_mean"])
    want = evaluate(oracle, full.workload.test_loader(0, 1), full.device)
    assert summary["final"]["swa_start_model/acc"] == want["acc"]
    assert summary["final"]["swa_start_model/loss"] == want["loss"]
    # Every evaluation of the kept model gives the same result (history: epochs 2 and 3).
    assert [h["results"].get("swa_start_model") for h in summary["history"]] == [None, want, want]
    # It survives a checkpoint: the stopped run, resumed, ends like the uninterrupted one.
    resumed = build_trainer(load_config(None, TINY + same), init_comm("single"), tmp_path / "stopped")
    resumed_summary = resumed.fit()
    assert resumed_summary["final"]["swa_start_model/acc"] == want["acc"]
    for a, b in zip(full.ctx.model.state_dict().values(), resumed.ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_recording_the_swa_start_model_leaves_the_final_weights_bitwise_unchanged(tmp_path):
    # Stochastic rounding: the extra BN update and evaluations must not draw from the run's noise.
    with_record, summary = run(tmp_path, "with", "method.name=swalp", *SWA_START)
    without, summary_without = run(tmp_path, "without", "method.name=swalp", *SWA_START,
                                   "method.record_swa_start_model=false")
    assert "swa_start_model/acc" in summary["final"] and "swa_start_model/acc" not in summary_without["final"]
    for (name, a), b in zip(with_record.ctx.model.state_dict().items(),
                            without.ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(with_record.strategy.average.parameters(), without.strategy.average.parameters(), strict=True):
        assert torch.equal(a, b)
    assert summary["final"]["swa/acc"] == summary_without["final"]["swa/acc"]


def test_the_training_model_is_evaluated_as_a_bn_updated_copy(tmp_path):
    trainer, summary = run(tmp_path, "bn", "method.name=swalp", "method.rounding=nearest", *SWA_START)
    evaluated = trainer._last_targets["model"]
    assert evaluated is not trainer.ctx.model
    oracle = copy.deepcopy(trainer.ctx.model)
    loader = trainer.workload.train_loader(trainer.strategy.data_shard(2))
    loader.set_epoch(2)
    update_bn_(oracle, loader, max_batches=2)
    for name, value in oracle.state_dict().items():
        assert torch.equal(evaluated.state_dict()[name], value), name
    assert summary["final"]["model/acc"] == evaluate(oracle, trainer.workload.test_loader(0, 1), trainer.device)["acc"]


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
