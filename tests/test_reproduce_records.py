"""The reproduce machinery's records (results/run_records/) and load files: what a finished run
keeps for a new machine, and what a rerun must not inherit from the run it replaces."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from mpi_util import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import reproduce  # noqa: E402
from swa_lib.config import to_dict  # noqa: E402


def test_a_finished_run_survives_a_new_machine_through_its_record(tmp_path, monkeypatch):
    """save_record keeps what the table needs (and, where asked, the model weights only);
    on a checkout without the run directory, restore_record brings it back as a finished run."""
    import torch

    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    spec["rows"][0]["record_weights"] = True
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "RECORDS", tmp_path / "records")
    job = reproduce.Job(spec, "smoke", spec["rows"][0], spec["seeds"][0])
    assert not job.recorded  # the smoke spec writes under runs/: its runs leave no record in results/
    job.recorded = True
    assert job.keep_weights
    (job.dir / "checkpoints" / "e0002-final").mkdir(parents=True)
    (job.dir / "tb").mkdir()
    (job.dir / "tb" / "events").write_text("e")
    (job.dir / "summary.json").write_text(json.dumps({"final": {"output/acc": 0.5}}))
    (job.dir / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "e0002-final"}))
    weights = {"w": torch.arange(4.0)}
    torch.save({"model": weights, "optimizer": {"big": torch.zeros(1000)}},
               job.dir / "checkpoints" / "e0002-final" / "rank0.pt")
    torch.save(weights, job.dir / "final_model.pt")
    job.load_file.write_text(json.dumps({"load": [1.0], "tables": [], "at_once": 1, "threads": 1}))
    job.save_record()
    other = reproduce.Job(spec, "smoke", spec["rows"][0], spec["seeds"][1])
    other.recorded = True
    shutil.copytree(job.dir, other.dir)
    other.save_record()
    assert not (job.record / "final_model.pt").exists() and not (other.record / "final_model.pt").exists()
    assert not (other.record / "checkpoints").exists() and (other.record / "summary.json").exists()
    shutil.rmtree(other.record)
    shutil.rmtree(other.dir)

    assert (job.record / "tb" / "events").read_text() == "e" and (job.record / "load.json").exists()
    kept = torch.load(job.record / "checkpoints" / "e0002-final" / "rank0.pt", weights_only=False)
    assert set(kept) == {"model"} and torch.equal(kept["model"]["w"], weights["w"])

    shutil.rmtree(job.dir)
    job.load_file.unlink()
    assert job.restore_record() and job.finished and job.load_file.exists()
    assert not job.restore_record()  # an existing run directory is never overwritten
    assert not other.keep_weights and not other.restore_record()  # no record: nothing to restore


def _finished_smoke_table(tmp_path, monkeypatch) -> tuple[dict, list]:
    """The smoke spec as a results/ table (its runs are recorded), every run finished at HEAD under
    tmp_path, none recorded yet."""
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    spec["output"] = "results/smoke.md"
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "RECORDS", tmp_path / "records")
    monkeypatch.setenv("SWA_REPRODUCE_ACTIVE", str(tmp_path / "active"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    jobs = reproduce.all_jobs(spec, "smoke")
    for job in jobs:
        job.dir.mkdir(parents=True)
        (job.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(job.config), sort_keys=False))
        (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": head}))
        (job.dir / "summary.json").write_text(json.dumps({"final": {"wall_s": 1.0}}))
    return spec, jobs


def test_a_run_that_finished_without_its_record_gets_one_at_the_next_invocation(tmp_path, monkeypatch):
    """A run can finish while its `reproduce` is being stopped, before the record is written; the
    next invocation finds it finished (nothing to train) and must still record it."""
    spec, jobs = _finished_smoke_table(tmp_path, monkeypatch)
    jobs[0].save_record()
    assert [(tmp_path / "records" / "smoke" / j.dir.name / "summary.json").exists() for j in jobs] == \
        [True] + [False] * (len(jobs) - 1)
    sharing = reproduce.Sharing("smoke")
    try:
        summaries, _, _ = reproduce.run_all(spec, "smoke", 1, "all", sharing)
    finally:
        sharing.close()
    assert len(summaries) == len(jobs)
    assert all((tmp_path / "records" / "smoke" / j.dir.name / "summary.json").exists() for j in jobs)


class _Trains(Exception):
    pass


@pytest.mark.parametrize("keep", ["all", "here"])
def test_no_records_trains_a_recorded_run_here_instead_of_restoring_it(tmp_path, monkeypatch, keep):
    """`reproduce --no-records` is how a user checks a table by training it: a run that has a
    committed record but no directory here is trained, not restored (by default it is restored)."""
    spec, jobs = _finished_smoke_table(tmp_path, monkeypatch)
    for job in jobs:  # every run recorded, as in a fresh clone of a finished table
        job.save_record()
    shutil.rmtree(tmp_path / "runs")

    def start(job, threads, at_once):
        raise _Trains(job.dir.name)

    monkeypatch.setattr(reproduce.Job, "start", start)
    sharing = reproduce.Sharing("smoke")
    try:
        if keep == "all":
            summaries, _, _ = reproduce.run_all(spec, "smoke", 1, keep, sharing)
            assert len(summaries) == len(jobs)  # all restored, nothing trained
        else:
            with pytest.raises(_Trains) as first:
                reproduce.run_all(spec, "smoke", 1, keep, sharing)
            assert str(first.value) == jobs[0].dir.name and not jobs[0].finished
            assert not any(j.finished for j in jobs)  # none restored
    finally:
        sharing.close()


def test_a_run_moved_aside_takes_its_load_file_and_a_new_run_starts_a_clean_one(tmp_path, monkeypatch):
    """A rerun must not inherit the stale run's load samples, concurrent tables or modified paths
    (they would show in the table's provenance as the rerun's)."""
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    job = reproduce.Job(spec, "smoke", spec["rows"][0], spec["seeds"][0])
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)  # not a git checkout: no file reads as modified
    job.threads = 1
    job.dir.mkdir(parents=True)
    stale_state = {"load": [9.0], "tables": ["swalp"], "dirty_paths": ["README.md"], "at_once": 2}
    job.load_file.write_text(json.dumps(stale_state))
    reproduce.move_aside(job, "its config differs")
    assert not job.load_file.exists()
    (moved,) = (tmp_path / "runs" / "smoke" / ".stale").iterdir()
    assert json.loads((moved / "load.json").read_text()) == stale_state
    job.load_file.write_text(json.dumps(stale_state))  # an orphan, as older versions left them
    job.note_start(at_once=1)
    state = json.loads(job.load_file.read_text())
    assert (state["load"], state["tables"], state["dirty_paths"]) == ([], [], [])  # none of the orphan's
    assert (state["at_once"], state["threads"]) == (1, 1)
    job.dir.mkdir()  # an interrupted run resumes: its own load file is kept
    job.seen = {"other"}
    job.record_load(at_once=1)
    job.note_start(at_once=1)
    assert json.loads(job.load_file.read_text())["tables"] == ["other"]


def test_a_record_keeps_in_process_workers_weights_for_the_error_plane(tmp_path, monkeypatch):
    import torch

    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    spec["rows"][0]["record_weights"] = True
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "RECORDS", tmp_path / "records")
    job = reproduce.Job(spec, "smoke", spec["rows"][0], spec["seeds"][0])
    job.recorded = True
    (job.dir / "checkpoints" / "e0002-final").mkdir(parents=True)
    (job.dir / "summary.json").write_text(json.dumps({"final": {"output/acc": 0.5}}))
    (job.dir / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "e0002-final"}))
    models = [{"w": torch.full((2,), float(k))} for k in range(2)]
    torch.save({"model": models[0], "optimizer": {"big": torch.zeros(1000)},
                "strategy": {"phase": "phase3", "workers": {"models": models, "optimizers": [{}, {}]}}},
               job.dir / "checkpoints" / "e0002-final" / "rank0.pt")
    job.save_record()
    kept = sorted(p.name for p in (job.record / "checkpoints" / "e0002-final").iterdir())
    assert kept == ["rank0-worker0.pt", "rank0-worker1.pt"]  # one file a worker, optimizer states left out
    for k in range(2):
        state = torch.load(job.record / "checkpoints" / "e0002-final" / f"rank0-worker{k}.pt", weights_only=False)
        assert set(state) == {"model"} and torch.equal(state["model"]["w"], models[k]["w"])
    from experiments.swap_plots import _worker_states
    assert [s["w"][0].item() for s in _worker_states(job.record / "checkpoints" / "e0002-final", 2)] == [0.0, 1.0]


def test_render_only_takes_the_record_over_a_run_directory_that_holds_another_run(tmp_path, monkeypatch):
    """--render-only renders runs across code changes, but a run directory left from before its row
    changed (another config or process count) is another run: the record is taken instead, and a
    run that no record replaces is named, not rendered."""
    spec, jobs = _finished_smoke_table(tmp_path, monkeypatch)
    for job, acc in zip(jobs, (0.5, 0.6, 0.7, 0.8), strict=False):
        (job.dir / "summary.json").write_text(json.dumps({"final": {"wall_s": 1.0, "output/acc": acc}}))
        job.save_record()
    first, second = jobs[0], jobs[1]
    stale = to_dict(first.config)
    stale["optim"]["lr"] = 0.5
    (first.dir / "config.yaml").write_text(yaml.safe_dump(stale, sort_keys=False))
    (first.dir / "summary.json").write_text(json.dumps({"final": {"wall_s": 1.0, "output/acc": 0.1}}))
    (second.dir / "run_info.json").write_text(json.dumps({"world_size": second.processes + 2}))
    (second.dir / "summary.json").write_text(json.dumps({"final": {"wall_s": 1.0, "output/acc": 0.2}}))
    summaries = reproduce.finished_runs(spec, "smoke")
    assert summaries[(first.label, first.seed)]["final"]["output/acc"] == 0.5  # the record, not the stale run
    assert summaries[(second.label, second.seed)]["final"]["output/acc"] == 0.6
    assert len(list((tmp_path / "runs" / "smoke" / ".stale").iterdir())) == 2  # moved aside, not deleted
    (second.record / "run_info.json").write_text(json.dumps({"world_size": second.processes + 1}))
    shutil.rmtree(second.dir)  # a record that is itself another run is named, not rendered
    with pytest.raises(SystemExit, match=f"not the ones the spec asks for: {second.dir.name} \\(it ran on"):
        reproduce.finished_runs(spec, "smoke")
    shutil.rmtree(tmp_path / "records" / "smoke" / first.dir.name)
    (first.dir / "config.yaml").write_text(yaml.safe_dump(stale, sort_keys=False))
    with pytest.raises(SystemExit, match=f"missing: {first.dir.name} .*its config differs in optim.lr"):
        reproduce.finished_runs(spec, "smoke")
