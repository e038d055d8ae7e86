"""TensorBoard logs read back with tensorboard's EventAccumulator: runs of different methods
share `epoch` and `output/*` tags, hparams exist from the start, and SWAP phase 2 logs each
worker's training scalars."""
from __future__ import annotations

import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from mpi_util import MPIRUN, PYTHON, REPO_ROOT
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config

TINY = ["data.dataset=cifar10_jpg", "data.train_subset=128", "data.test_subset=100", "model.name=resnet9",
        "model.kwargs={width: 4}", "optim.batch_size=32", "schedule.epochs=3", "eval.batch_size=100",
        "eval.bn_update_batches=2", "run.progress=false", "eval.every_epochs=1"]


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _series(acc, tag) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def _hparams(acc) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """The hparams plugin's records by tag: experiment, session_start_info, session_end_info."""
    out = {}
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData()
        data.ParseFromString(content)
        out[tag.split("/")[-1]] = data
    return out


def _train(tmp_path, method: str, *overrides):
    cfg = load_config(None, TINY + [f"method.name={method}", *overrides])
    trainer = build_trainer(cfg, init_comm("single"), tmp_path)
    summary = trainer.fit()
    trainer.logger.close()
    return summary


def test_epoch_and_output_tags_follow_the_run_and_the_method_output(tmp_path):
    """SWA from epoch 2: `output/*` is the training model at epoch 1, the average after it."""
    summary = _train(tmp_path, "swa", "method.swa_start_epoch=2", "method.swa_lr=0.05")
    acc = _events(tmp_path)
    assert {"epoch", "output/acc", "output/loss"} <= set(acc.Tags()["scalars"])
    history = summary["history"]
    output = _series(acc, "output/acc")
    assert sorted(output) == [h["step"] for h in history]  # one point per evaluation
    for h in history:
        name = "swa" if "swa" in h["results"] else "model"
        assert output[h["step"]] == pytest.approx(h["results"][name]["acc"])
    assert "swa" not in history[0]["results"] and "swa" in history[-1]["results"]  # both cases were seen
    assert _series(acc, "output/loss")[history[-1]["step"]] == pytest.approx(summary["final"]["output/loss"])
    # epoch against step: one value per logged step, fractional inside an epoch, whole at its end.
    epochs = _series(acc, "epoch")
    steps_per_epoch = history[0]["step"]
    assert sorted(epochs) == sorted(set(epochs))
    for step, epoch in epochs.items():
        assert epoch == pytest.approx(step / steps_per_epoch, abs=1e-4)
    assert epochs[history[-1]["step"]] == 3


def test_hparams_are_written_at_the_start_and_the_session_ends_with_the_run(tmp_path):
    _train(tmp_path, "sgd", "run.stop_after_epochs=1", "optim.lr=0.07")  # paused after one epoch
    records = _hparams(_events(tmp_path))
    assert set(records) == {"experiment", "session_start_info"}, records.keys()
    hparams = records["session_start_info"].session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(0.07)
    assert hparams["method.name"].string_value == "sgd" and hparams["model.name"].string_value == "resnet9"
    metrics = [m.name.tag for m in records["experiment"].experiment.metric_infos]
    assert metrics == ["output/acc", "output/loss"]
    _train(tmp_path, "sgd", "optim.lr=0.07")  # the same command again resumes and finishes
    records = _hparams(_events(tmp_path))
    assert records["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


@pytest.mark.timeout(300)
def test_swap_phase_2_logs_every_workers_training_scalars(tmp_path):
    """2 ranks, 2 workers: phase 1 is epochs 1-2 (one model), phase 2 epoch 3 (two models)."""
    cmd = [*MPIRUN, "-np", "2", "-x", "OMP_NUM_THREADS=1", PYTHON, str(REPO_ROOT / "experiments/swap_cifar.py"),
           "--config", str(REPO_ROOT / "configs/swap/cifar10_resnet9_swap_smoke.yaml"), "--run-dir", str(tmp_path),
           *TINY, "method.workers=2", "method.stop_accuracy=null", "method.phase2_epochs=1",
           "method.phase2_batch_size=16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    acc = _events(tmp_path)
    workers = {k: _series(acc, f"train_worker{k}/epoch_acc") for k in (0, 1)}
    phase2_step = max(_series(acc, "train/epoch_acc"))  # the last epoch is the one in phase 2
    assert sorted(workers[0]) == sorted(workers[1]) == [phase2_step], workers
    # Rank 0 is worker 0, whose own group's epoch accuracy is train/epoch_acc in phase 2.
    assert workers[0][phase2_step] == pytest.approx(_series(acc, "train/epoch_acc")[phase2_step])
    assert set(_series(acc, "train_worker1/epoch_loss")) == {phase2_step}
    assert "output/acc" in acc.Tags()["scalars"] and "eval_worker1/model/acc" in acc.Tags()["scalars"]
