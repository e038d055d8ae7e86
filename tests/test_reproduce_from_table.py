"""A table whose rows are another table's runs (`from_table`, experiments/tables.load_spec): an
ablation table compares against the main table's baseline without training it again, and its
wall time leaves those runs out, so each table keeps its own time budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from mpi_util import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import reproduce, summary, tables  # noqa: E402
from swa_lib.config import to_dict  # noqa: E402

SMOKE = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())


def _specs(root, ablation_rows: list[dict], ablation_seeds=(0, 1)) -> None:
    """configs/reproduce/{main,ablation}.yaml under `root`: main is the smoke table (SGD and SWA
    rows, seeds 0 and 1); the ablation table has the given rows."""
    specs = root / "configs" / "reproduce"
    specs.mkdir(parents=True, exist_ok=True)
    (specs / "main.yaml").write_text(yaml.safe_dump(dict(SMOKE, output="results/main.md", claims=[])))
    (specs / "ablation.yaml").write_text(yaml.safe_dump({
        "title": "ablation", "output": "results/ablation.md", "entry": SMOKE["entry"], "processes": 1,
        "seeds": list(ablation_seeds), "rows": ablation_rows,
        "paired": [["SWA late", "SGD", "SWA late − SGD"]],
        "claims": [{"claim": "SWA late beats SGD", "paper": "p", "paper_status": "unverified",
                    "difference": ["SWA late", "SGD"], "expect": "positive"}]}))


SWA_LATE = {"label": "SWA late", "config": SMOKE["rows"][1]["config"],
            "overrides": [*SMOKE["rows"][1]["overrides"], "schedule.epochs=3"]}


def test_a_row_from_another_table_is_that_tables_row_and_run(tmp_path, monkeypatch):
    _specs(tmp_path, [{"label": "SGD", "from_table": "main"}, SWA_LATE])
    spec = tables.load_spec("ablation", tmp_path / "configs" / "reproduce")
    sgd = spec["rows"][0]
    assert (sgd["config"], sgd["overrides"]) == (SMOKE["rows"][0]["config"], SMOKE["rows"][0]["overrides"])
    assert (sgd["from_table"], sgd["entry"], sgd["processes"]) == ("main", SMOKE["entry"], 1)
    assert spec["rows"][1] == SWA_LATE  # its own row as written
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "RECORDS", tmp_path / "records")
    jobs = {(j.label, j.seed): j for j in reproduce.all_jobs(spec, "ablation")}
    main_sgd = reproduce.Job(SMOKE, "main", SMOKE["rows"][0], 1)
    assert jobs[("SGD", 1)].dir == main_sgd.dir == tmp_path / "runs" / "main" / "SGD-s1"
    assert jobs[("SGD", 1)].record == tmp_path / "records" / "main" / "SGD-s1"
    assert jobs[("SGD", 1)].config == main_sgd.config  # the same run, so the same resolved config
    assert jobs[("SWA late", 0)].dir == tmp_path / "runs" / "ablation" / "SWA_late-s0"


@pytest.mark.parametrize("row, seeds, message", [
    ({"label": "SGD", "from_table": "nosuch"}, (0, 1), "row 'SGD' is from table 'nosuch', which has no spec"),
    ({"label": "LB", "from_table": "main"}, (0, 1),
     "table 'main' has no row 'LB' of its own to take (its rows: SGD, SWA)"),
    ({"label": "SGD", "from_table": "main"}, (0, 1, 2), "row 'SGD' asks for seeds [0, 1, 2]; table 'main' runs it "
                                                         "with [0, 1]"),
])
def test_a_row_from_another_table_that_cannot_be_taken_names_why(tmp_path, row, seeds, message):
    _specs(tmp_path, [row, SWA_LATE], seeds)
    with pytest.raises(tables.SpecError) as err:
        tables.load_spec("ablation", tmp_path / "configs" / "reproduce")
    assert str(err.value) == f"ablation.yaml: {message}"


def _finish(job, wall_s: float, acc: float) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    job.dir.mkdir(parents=True)
    (job.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(job.config), sort_keys=False))
    (job.dir / "run_info.json").write_text(json.dumps({
        "world_size": job.processes, "git_commit": head, "machine": "vm",
        "started": f"2026-01-01T0{job.seed}:00:00",  # one after another
        "config": to_dict(job.config)}))
    (job.dir / "summary.json").write_text(json.dumps({
        "final": {"output/acc": acc, "wall_s": wall_s}, "history": [], "steps": 10,
        "train_images": 1000, "eval_images": 500}))


def test_an_ablation_table_renders_from_the_main_tables_runs_and_counts_only_its_own_time(tmp_path, monkeypatch):
    _specs(tmp_path, [{"label": "SGD", "from_table": "main"}, SWA_LATE])
    (tmp_path / "configs" / "baselines").symlink_to(REPO_ROOT / "configs" / "baselines")  # ROOT is tmp_path
    for name, value in {"ROOT": tmp_path, "SPECS": tmp_path / "configs" / "reproduce",
                        "RUNS": tmp_path / "runs", "RECORDS": tmp_path / "records"}.items():
        monkeypatch.setattr(reproduce, name, value)
    monkeypatch.setenv("SWA_REPRODUCE_ACTIVE", str(tmp_path / "active"))
    spec = tables.load_spec("ablation", tmp_path / "configs" / "reproduce")
    for job in reproduce.all_jobs(spec, "ablation"):  # main's SGD: an hour a run; the ablation's own: 100 s
        _finish(job, 3600.0 if job.table == "main" else 100.0, 0.50 + (0.02 if job.table == "main" else 0.03))
    out = reproduce.reproduce("ablation", None, render_only=True)
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["table_wall_s"] == pytest.approx(200.0)  # the 2 own runs, not main's 2 hours
    assert list(numbers["paired"]["SWA late − SGD"]["per_seed"].values()) == pytest.approx([1.0, 1.0])
    text = out.read_text()
    assert "- wall time of the table: 0.06 h (its own runs; " in text and "sum to 0.06 h)" in text
    assert "- rows taken from other tables (their runs, reused; their wall time counts there, not in this " \
           "table's): SGD from `main` (`./run.sh reproduce main`)" in text
    assert "`runs/reproduce/ablation/` and `runs/reproduce/main/`" in text
    # The summary counts the table's own runs only (main's are main's).
    (tmp_path / "results" / "ablation.json").unlink()
    _, _, missing = summary.claim_rows(tmp_path, ["ablation"])
    assert missing == ["`ablation` (no results/ablation.json: run `./run.sh reproduce ablation`)"]
    (tmp_path / "results" / "run_records" / "ablation" / "SWA_late-s0").mkdir(parents=True)
    (tmp_path / "results" / "run_records" / "ablation" / "SWA_late-s0" / "summary.json").write_text("{}")
    _, _, missing = summary.claim_rows(tmp_path, ["ablation"])
    assert "1 of its 2 runs recorded" in missing[0]


def test_a_row_from_a_table_running_now_is_not_trained_twice(tmp_path, monkeypatch):
    """Two invocations training one run directory at once would corrupt it: the ablation table
    stops, naming the rows, while the table that owns them is running."""
    _specs(tmp_path, [{"label": "SGD", "from_table": "main"}, SWA_LATE])
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "RECORDS", tmp_path / "records")
    monkeypatch.setenv("SWA_REPRODUCE_ACTIVE", str(tmp_path / "active"))
    (tmp_path / "active").mkdir()
    (tmp_path / "active" / f"main.{os.getpid()}").write_text("main")  # `reproduce main`, alive
    spec = tables.load_spec("ablation", tmp_path / "configs" / "reproduce")
    training = tmp_path / "runs" / "main" / "SGD-s0"  # main is training it (a config this checkout would not reuse)
    training.mkdir(parents=True)
    (training / "config.yaml").write_text("{}")
    sharing = reproduce.Sharing("ablation")
    try:
        with pytest.raises(SystemExit) as stop:
            reproduce.run_all(spec, "ablation", 1, "all", sharing)
    finally:
        sharing.close()
    assert str(stop.value) == ("reproduce ablation: rows SGD are the runs of table(s) main, which are running now "
                               "and will train them; run this table again when they end")
    assert not (tmp_path / "runs" / "ablation").exists()  # nothing started
    assert (training / "config.yaml").exists() and not (tmp_path / "runs" / "main" / ".stale").exists()  # nor moved


def test_only_a_table_running_in_this_checkout_blocks_its_rows(tmp_path, monkeypatch):
    """The refusal above is about one run directory: `reproduce main` in another clone trains that
    clone's runs, so it shares the cores (provenance names it) without blocking this checkout's rows.
    A table that did not say where its runs live (an older reproduce) still blocks, to be safe."""
    monkeypatch.setenv("SWA_REPRODUCE_ACTIVE", str(tmp_path / "active"))
    (tmp_path / "active").mkdir()
    here, elsewhere = tmp_path / "here" / "runs", tmp_path / "clone" / "runs"
    alive = os.getpid()  # any live pid: the files are named table.pid
    (tmp_path / "active" / f"main.{alive}").write_text(f"main\n{elsewhere}")
    (tmp_path / "active" / f"hwa.{alive}").write_text(f"hwa\n{here}")
    (tmp_path / "active" / f"swap.{alive}").write_text("swap")  # no runs directory recorded
    (tmp_path / "active" / "averaging.999999999").write_text(f"averaging\n{here}")  # dead pid
    sharing = reproduce.Sharing("ablation", here)
    try:
        assert sharing.running_tables() == {"main", "hwa", "swap"}
        assert sharing.running_tables(here) == {"hwa", "swap"}
        assert (tmp_path / "active" / f"ablation.{alive}").read_text() == f"ablation\n{here.resolve()}"
    finally:
        sharing.close()


def test_all_runs_a_table_before_the_tables_that_take_its_rows(tmp_path, monkeypatch):
    _specs(tmp_path, [{"label": "SGD", "from_table": "main"}, SWA_LATE])
    monkeypatch.setattr(reproduce, "SPECS", tmp_path / "configs" / "reproduce")
    assert reproduce.headline_specs() == ["main", "ablation"]  # not by name: "ablation" would train main's runs
