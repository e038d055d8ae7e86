"""The SWAP table's time model and error-plane inputs (experiments/swap_plots.py)."""
import json
from pathlib import Path

import pytest
import torch

from experiments.swap_plots import _phase_steps, _worker_states, modelled_train_s, models_per_process
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config

RECORDS = Path(__file__).resolve().parents[1] / "results" / "run_records" / "pilot_swap_12ep"


def summary(run: str) -> dict:
    return json.loads((RECORDS / run / "summary.json").read_text())


def test_in_process_workers_count_as_parallel_in_the_model():
    swap = summary("SWAP_9_3_ep_LR_0.05-s0")  # 4 workers on 2 processes
    f = swap["final"]
    assert swap["world_size"] == 2 and models_per_process(swap) == 2
    # Phase 2 ran 2 workers one after another on each process: the model halves its seconds.
    expected = f["time/train"] - f["time/phase/phase2"] / 2
    assert modelled_train_s(swap, processes=2, cores=2) == pytest.approx(expected)
    # 2 processes sharing 1 core: every phase at half speed, so the model halves it again.
    assert modelled_train_s(swap, processes=2, cores=1) == pytest.approx(expected / 2)


def test_steps_per_phase_split_at_the_evaluated_phase_switches():
    """Phase 1 of 8 epochs of 24 steps, then 3 epochs of 390 steps a worker, with evaluations every
    2 epochs inside both phases (the SWAP table's seed-0 run): each entry names the phase after it."""
    swap = json.loads((RECORDS.parent / "swap" / "SWAP-s0" / "summary.json").read_text())
    assert [(h["step"], h["phase"]) for h in swap["history"]] == [
        (48, "phase1"), (96, "phase1"), (144, "phase1"), (192, "phase2"), (972, "phase2"), (1362, "phase3")]
    assert _phase_steps(swap) == {"phase1": 8 * 24, "phase2": 3 * 390}
    assert sum(_phase_steps(swap).values()) == swap["steps"]  # the critical path
    sparse = {**swap, "history": [h for h in swap["history"] if h["phase"] != "phase1"]}  # no phase-1 evaluation
    assert _phase_steps(sparse) == {"phase1": 8 * 24, "phase2": 3 * 390}
    sb = summary("SB_2_x_64_12_ep-s0")
    assert _phase_steps(sb) == {"train": sb["steps"]}


def test_plain_data_parallel_runs_are_their_measured_seconds_with_a_core_each():
    sb = summary("SB_2_x_64_12_ep-s0")
    assert models_per_process(sb) == 1
    assert modelled_train_s(sb, processes=2, cores=2) == pytest.approx(sb["final"]["time/train"])
    assert modelled_train_s(sb, processes=4, cores=2) == pytest.approx(sb["final"]["time/train"] / 2)


def test_the_error_plane_reads_in_process_workers_from_the_last_checkpoint(tmp_path):
    """4 workers on one process: the plane's three points are workers 0-2, not the process's model."""
    cfg = load_config(None, ["data.dataset=cifar10_jpg", "data.train_subset=128", "data.test_subset=100",
                             "model.name=resnet9", "model.kwargs={width: 4}", "optim.batch_size=16",
                             "schedule.epochs=2", "eval.batch_size=100", "eval.bn_update_batches=2",
                             "run.progress=false", "method.workers=4", "method.phase2_epochs=1",
                             "method.phase2_batch_size=16"], default_method="swap")
    trainer = build_trainer(cfg, init_comm("single"), tmp_path)
    trainer.fit()
    tag = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["tag"]
    states = _worker_states(tmp_path / "checkpoints" / tag, 3)
    workers = trainer.strategy.local_workers
    for k, state in enumerate(states):
        for name, tensor in workers.model_state_dict(k).items():
            assert torch.equal(state[name], tensor), (k, name)
    assert not all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))  # distinct workers
    with pytest.raises(ValueError, match="holds 4 phase-2 workers"):
        _worker_states(tmp_path / "checkpoints" / tag, 5)
