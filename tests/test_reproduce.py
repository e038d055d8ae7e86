"""The reproduce machinery: refs into run summaries, claim verdicts, table time, the launcher, and one real table."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from mpi_util import PYTHON, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import provenance, reproduce, summary, tables  # noqa: E402


def fake_summary(final_model_acc=0.80):
    history = [{"epoch": 1, "step": 10, "results": {"model": {"acc": 0.50}}},
               {"epoch": 2, "step": 20, "results": {"model": {"acc": 0.70}, "ema": {"acc": 0.81}}},
               {"epoch": 2, "step": 20, "results": {"model": {"acc": 0.71}, "ema": {"acc": 0.82}}},  # re-evaluated
               {"epoch": 3, "step": 30, "results": {"model": {"acc": final_model_acc}, "ema": {"acc": 0.79}}}]
    return {"final": {"output/acc": 0.79, "model/acc": final_model_acc, "ema/acc": 0.79, "wall_s": 5.0},
            "history": history, "steps": 30}


def test_refs_read_final_values_history_points_and_steps_to_final():
    s = fake_summary()
    assert tables.metric_value(s, None) == 0.79
    assert tables.metric_value(s, "model/acc") == 0.80
    assert tables.metric_value(s, "ema/acc@e2") == 0.82  # the last evaluation after epoch 2 wins
    assert tables.metric_value(s, "ema/steps_to_final") == 20.0  # ema reached 0.80 at step 20
    assert tables.metric_value(s, "model/steps_to_final") == 30.0
    assert tables.metric_value(fake_summary(0.95), "ema/steps_to_final") == 30.0  # never: the last step
    assert tables.metric_value(s, "model/steps_to_final*0.6") == 10.0  # 0.48: 0.50 at step 10
    assert tables.metric_value(s, "model/steps_to_final*0.85") == 20.0  # 0.68: 0.70 at step 20
    assert tables.metric_value(s, "model/steps_to_final*0.9") == 30.0  # 0.72: not before the end
    assert tables.metric_value(fake_summary(0.95), "ema/steps_to_final*0.85") == 20.0  # 0.8075: 0.81 at 20
    with pytest.raises(KeyError, match="after epoch 7"):
        tables.metric_value(s, "ema/acc@e7")


def test_run_directories_hold_no_space_slash_or_parenthesis():
    assert tables.run_dir_name("SGD", 0) == "SGD-s0"
    assert tables.run_dir_name("K=1 (SGD / offline-only)", 2) == "K=1_SGD_offline-only-s2"
    assert tables.run_dir_name("SWA + dense average", 1) == "SWA_dense_average-s1"
    assert tables.run_dir_name("LB (2 x 1,024)", 0) == "LB_2_x_1_024-s0"


def test_paired_differences_and_percent_or_error():
    spec = {"title": "t", "seeds": [0, 1], "rows": [{"label": "A"}, {"label": "B", "seeds": [1]}]}
    runs = {("A", 0): fake_summary(0.8), ("A", 1): fake_summary(0.9), ("B", 1): fake_summary(0.6)}
    t = tables.Table(spec, runs)
    assert t.values("A@model/acc") == {0: pytest.approx(80.0), 1: pytest.approx(90.0)}
    assert t.difference("A@model/acc", "B@model/acc") == {1: pytest.approx(30.0)}  # only shared seeds
    assert t.values("A@model/steps_to_final") == {0: 30.0, 1: 30.0}  # not an accuracy: as it is
    error = tables.Table({**spec, "report": "error"}, runs)
    assert error.values("A@model/acc") == {0: pytest.approx(20.0), 1: pytest.approx(10.0)}


def test_a_paired_difference_across_two_cpu_models_is_marked_in_the_table_and_the_summary(tmp_path):
    spec = {"title": "t", "seeds": [0, 1], "rows": [{"label": "A"}, {"label": "B"}],
            "paired": [["A", "B", "A − B"], ["A", "A@model/acc", "A − its model"]],
            "claims": [{"claim": "A beats B", "paper": "p", "paper_status": "verified",
                        "difference": ["A@model/acc", "B"], "expect": "positive"}]}
    runs = {(label, seed): fake_summary(0.8 + seed * 0.015) for label in "AB" for seed in (0, 1)}
    cpus = {("A", 0): "25/17/1", ("B", 0): "25/17/1", ("A", 1): "25/17/1", ("B", 1): "6/207/2"}
    markdown, numbers = tables.render(spec, runs, [], [], cpus=cpus)
    assert "| A − B | 0.00 ± 0.00 | +0.00, +0.00† |" in markdown, markdown
    assert "| A − its model | -1.75 ± 1.06 | -1.00, -2.50 |" in markdown  # one run: one machine
    assert tables.CROSS_CPU in markdown and numbers["claims"][0]["cross_cpu_seeds"] == [1]
    same, _ = tables.render(spec, runs, [], [], cpus={k: "25/17/1" for k in cpus})
    assert "†" not in same and tables.render(spec, runs, [], [])[0] == same  # unknown: nothing claimed
    assert tables.cross_cpu({**cpus, ("B", 1): "?"}, "A", "B", [0, 1]) == []  # one unrecorded: not claimed
    (tmp_path / "configs" / "reproduce").mkdir(parents=True)
    (tmp_path / "configs" / "reproduce" / "t.yaml").write_text(yaml.safe_dump({**spec, "output": "results/t.md"}))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.json").write_text(json.dumps({**numbers, "elapsed_s": 60}))
    page = summary.write(tmp_path, ["t"]).read_text()
    row = next(line for line in page.splitlines() if line.startswith("| A beats B"))
    assert "(+1.00, +2.50†)" in row and tables.CROSS_CPU in page, row


@pytest.mark.parametrize("diffs, expect, verdict", [
    ([0.2, 0.1, 0.4], "positive", "holds"),
    ([0.5, -0.1, 0.4], "positive", "partly"),
    ([-0.5, 0.1, -0.4], "positive", "does not hold here"),
    ([-0.5, -0.1, -0.4], "negative", "holds"),
    ([0.0, 0.0, 0.0], "positive", "does not hold here"),
    ([0.1, -0.2, 0.05], "within 0.3", "holds"),
    ([0.5, -0.2, 0.0], "within 0.3", "partly"),
    ([0.5, 0.4, 0.9], "within 0.3", "does not hold here"),
    ([-0.03, -0.01, 0.08], "positive", "does not hold here"),  # the mean agrees, one seed of 3: noise
    ([-585, 0, 0], "negative", "does not hold here"),  # a tie is not fewer steps
    ([0.05, 0.32, -0.12], "within 0.3", "partly"),  # 2 of 3 within the margin, and the mean
    ([-0.74, -0.91, -0.5], "at most 0.3", "holds"),  # b well above a: not worse
    ([-0.74, -0.91, -0.5], "within 0.3", "does not hold here"),  # the same, read as "no difference"
    ([0.4, 0.1, -0.2], "at most 0.3", "partly"),
    ([0.4, 0.5, -0.2], "at most 0.3", "does not hold here"),
])
def test_claim_verdicts(diffs, expect, verdict):
    assert summary.verdict(diffs, expect) == verdict


def test_summary_page_names_both_sides_and_counts_the_recorded_runs_of_an_unfinished_table(tmp_path):
    specs = tmp_path / "configs" / "reproduce"
    specs.mkdir(parents=True)
    claim = {"claim": "X beats its own start", "paper": "p", "paper_status": "verified",
             "difference": ["X", "X@start/acc"], "expect": "positive"}
    claims = [{**claim, "names": ["X", "start"]}, {**claim, "claim": "Y (added later)"}]
    (specs / "done.yaml").write_text(yaml.safe_dump({"output": "results/done.md", "rows": [{"label": "X"}],
                                                     "seeds": [0, 1], "claims": claims}))
    (specs / "half.yaml").write_text(yaml.safe_dump({"output": "results/half.md", "seeds": [0, 1, 2],
                                                     "rows": [{"label": "A"}, {"label": "B"}]}))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "done.json").write_text(json.dumps({"elapsed_s": 7200, "claims": [
        {**claim, "per_seed": {"0": 0.5, "1": -0.1}, "a": {"0": 80.0, "1": 81.0}, "b": {"0": 79.5, "1": 81.1}}]}))
    for run in ("A-s0", "B-s0", "A-s1"):
        (tmp_path / "results" / "run_records" / "half" / run).mkdir(parents=True)
        (tmp_path / "results" / "run_records" / "half" / run / "summary.json").write_text("{}")
    page = summary.write(tmp_path, ["done", "half"]).read_text()
    row = next(line for line in page.splitlines() if line.startswith("| X beats its own start"))
    assert "X: 80.50 ± 0.71; start: 80.30 ± 1.13" in row and "(+0.50, -0.10)" in row, row
    assert "**does not hold here**" in row, row  # 1 seed of 2 agrees with the mean: not most
    assert "2.0 h of wall time in all (done 2.00 h;" in page and "Every table is within 2 hours." in page
    assert "`half` (no results/half.json: 3 of its 6 runs recorded in results/run_records/half/" in page, page
    assert "`done`'s claim(s) 'Y (added later)' (not yet in results/done.json: run `./run.sh reproduce done`)" in page
    assert "Out of date" not in page
    (tmp_path / "results" / "done.json").write_text(json.dumps({"elapsed_s": 7300, "claims": []}))
    assert "Over the 2-hour budget of a table as measured, sharing included: done." in \
        summary.write(tmp_path, ["done", "half"]).read_text()
    page = summary.write(tmp_path, ["done", "half"], {"done": ["its config differs in optim.lr"] * 2, "half": []})
    assert "Out of date" in page.read_text() and "`done` (2 recorded run(s) would rerun: its config differs in " \
        "optim.lr)." in page.read_text() and "`half` (" not in page.read_text().split("Out of date")[1]


def test_table_time_counts_reused_runs_divided_by_the_runs_that_shared_the_cores(tmp_path):
    (tmp_path / "t").mkdir()
    # A-s0 ran alone in an earlier invocation, B-s0 beside another run; A-s1 has no load file
    # (this invocation, 2 at once).
    (tmp_path / "t" / "A-s0.load.json").write_text(json.dumps({"load": [1.0], "tables": [], "at_once": 1}))
    (tmp_path / "t" / "B-s0.load.json").write_text(json.dumps({"load": [2.0], "tables": [], "at_once": 2}))
    runs = {("A", 0): {"final": {"wall_s": 3600.0}}, ("B", 0): {"final": {"wall_s": 1800.0}},
            ("A", 1): {"final": {"wall_s": 1200.0}}}
    loads = {(label, seed): (tmp_path / "t" / f"{label}-s{seed}", tmp_path / "t" / f"{label}-s{seed}.load.json")
             for label, seed in runs}  # no run directories: no spans
    assert provenance.table_wall_s(runs, loads, at_once=2) == 3600.0 + 900.0 + 600.0
    # B-s0's samples say it trained beside another run for half its time and alone for the rest
    # (the last run of an odd count): it counts 1800 / 1.5, not 1800 / 2.
    (tmp_path / "t" / "B-s0.load.json").write_text(json.dumps(
        {"load": [2.0] * 4, "tables": [], "at_once": 2, "together": [2, 2, 1, 1]}))
    assert provenance.table_wall_s(runs, loads, at_once=2) == 3600.0 + 1200.0 + 600.0
    # Without samples, where every run started once, its run_info.json's start and its wall time say
    # when it trained: A-s0 from 0 to 3600 s, B-s0 beside it from 0 to 1800, A-s1 from 3000 to 4200
    # (the last of an odd count, alone for its last 600 s): each moment counts once, 4200 s in all.
    for (label, seed), start in {("A", 0): "10:00:00", ("B", 0): "10:00:00", ("A", 1): "10:50:00"}.items():
        (tmp_path / "t" / f"{label}-s{seed}").mkdir()
        info = {"started": f"2026-12-02T{start}"}
        (tmp_path / "t" / f"{label}-s{seed}" / "run_info.json").write_text(json.dumps(info))
    (tmp_path / "t" / "B-s0.load.json").write_text(json.dumps({"load": [2.0], "tables": [], "at_once": 2}))
    assert provenance.table_wall_s(runs, loads, at_once=2) == pytest.approx(
        (1800 / 2 + 1200 + 600 / 2) + 1800 / 2 + (600 / 2 + 600))  # A-s0, B-s0, A-s1
    assert provenance.table_wall_s(runs, loads, at_once=2) == pytest.approx(4200.0)  # the span, here
    # Runs of two sittings (a gap between them): the layout's other slots may have held runs no longer
    # in the table, so the spans would count them whole: back to the layout.
    (tmp_path / "t" / "A-s1" / "run_info.json").write_text(json.dumps({"started": "2026-12-02T11:20:00"}))
    assert provenance.table_wall_s(runs, loads, at_once=2) == 3600.0 + 900.0 + 600.0
    # A run with samples (newer code, another sitting) is counted by them, and the runs without by
    # their spans among themselves (one sitting): A-s0 and B-s0 as above, A-s1 by [2, 1].
    (tmp_path / "t" / "A-s1.load.json").write_text(json.dumps({"load": [1.0], "tables": [], "at_once": 2,
                                                               "together": [2, 1]}))
    assert provenance.table_wall_s(runs, loads, at_once=2) == pytest.approx(
        (1800 / 2 + 1800) + 1800 / 2 + 1200 / 1.5)
    (tmp_path / "t" / "A-s1.load.json").unlink()
    # A run started twice (its wall time adds up both starts) leaves no span: back to the layout.
    (tmp_path / "t" / "A-s1" / "run_info.json").write_text(json.dumps(
        {"started": "2026-12-02T10:50:00", "earlier_starts": [{"started": "2026-12-01T09:00:00"}]}))
    assert provenance.table_wall_s(runs, loads, at_once=2) == 3600.0 + 900.0 + 600.0
    # The summary takes that figure; an older table without it gets the larger of its last invocation
    # and its runs' time over the runs at a time, never only a short final invocation.
    assert summary.table_seconds({"table_wall_s": 5100.0, "elapsed_s": 10.0}) == 5100.0
    assert summary.table_seconds({"elapsed_s": 60.0, "run_wall_s": 7200.0, "jobs_at_once": 2}) == 3600.0
    assert summary.table_seconds({"elapsed_s": 8000.0, "run_wall_s": 7200.0, "jobs_at_once": 2}) == 8000.0


def test_jobs_go_seed_by_seed():
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    order = [(j.seed, j.label) for j in reproduce.all_jobs(spec, "smoke")]
    labels = [row["label"] for row in spec["rows"]]
    assert order == [(seed, label) for seed in sorted(spec["seeds"]) for label in labels]


def test_the_bar_counts_the_epochs_a_run_has_logged(tmp_path, monkeypatch):
    """The progress bar moves while a run trains (and starts a resumed run part done): the run's
    last logged epoch, read from the tail of its metrics file, over its whole budget."""
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    job = reproduce.all_jobs(spec, "smoke")[1]
    epochs = job.config.schedule.epochs
    assert epochs >= 2 and job.progress() == 0.0  # nothing logged yet
    job.dir.mkdir(parents=True)
    lines = [json.dumps({"step": i, "epoch": i / 500, "train/loss": 0.5}) for i in range(1, 500 * (epochs - 1) + 1)]
    assert len("\n".join(lines)) > 2 * 4096  # the tail read starts mid-file, mid-line
    (job.dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 10000, "epo')  # its last line half written
    assert job.progress() == pytest.approx(job.cost * (epochs - 1) / epochs)
    (job.dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": epochs + 3}) + "\n")
    assert job.progress() == job.cost  # never past the job's cost (SWAP's phases share schedule.epochs)


def test_an_invocation_that_trains_nothing_adds_nothing_to_what_shared_the_cores(tmp_path, monkeypatch):
    """A --render-only (or all-reused) invocation must not write its own load average and the
    tables running beside it into the provenance of runs that trained earlier."""
    import os

    monkeypatch.setenv("SWA_REPRODUCE_ACTIVE", str(tmp_path / "active"))
    (tmp_path / "active").mkdir()
    (tmp_path / "active" / f"other_table.{os.getpid()}").write_text("other_table")  # a live table beside it
    sharing = reproduce.Sharing("smoke")
    try:
        assert sharing.loads == [] and sharing.others == set()
        sharing.sample()  # what run_all does while runs train
        assert len(sharing.loads) == 1 and sharing.others == {"other_table"}
    finally:
        sharing.close()


def test_a_run_names_only_the_tables_that_ran_while_it_trained(tmp_path, monkeypatch):
    """A table seen beside an early run is not in a later run's load file once it has ended
    (the invocation's own list keeps it); before, every later run inherited it."""
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setenv("SWA_REPRODUCE_ACTIVE", str(tmp_path / "active"))
    (tmp_path / "active").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (tmp_path / "active" / f"other_table.{other.pid}").write_text("other_table")
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    early, late = reproduce.all_jobs(spec, "smoke")[:2]
    sharing = reproduce.Sharing("smoke")
    try:
        sharing.sample([early])
        other.kill()
        other.wait()
        sharing.sample([early, late])
    finally:
        sharing.close()
    assert sharing.others == {"other_table"} and sharing.current == set()
    for job in (early, late):
        job.dir.parent.mkdir(parents=True, exist_ok=True)
        job.threads = 1
        job.record_load(at_once=2)
    assert early.load_state()["tables"] == ["other_table"] and late.load_state()["tables"] == []
    late.record_load(at_once=2, together=1)  # what run_all passes: this table's runs training now
    assert late.load_state()["together"] == [1] and "together" not in early.load_state()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [1, 2])
def test_a_stopped_reproduce_lets_its_runs_checkpoint(tmp_path, processes):
    """stop_runs sends the signal to the ranks, not to mpirun (which kills its ranks within a second
    of a SIGTERM): each rank gets the time to finish its step and checkpoint, then exits 75."""
    import signal

    rank = tmp_path / "rank.py"
    rank.write_text("import os, signal, sys, time\n"
                    "got = []\n"
                    "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
                    f"open(r'{tmp_path}/ready.' + str(os.getpid()), 'w').close()\n"
                    "while not got: time.sleep(0.05)\n"
                    "time.sleep(2)  # a step and a checkpoint\n"
                    f"open(r'{tmp_path}/checkpointed.' + str(os.getpid()), 'w').close()\n"
                    "sys.exit(75)\n")
    cmd = reproduce.launch_command(str(rank), processes, "c.yaml", tmp_path, [])[:-4]  # no --config/--run-dir
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready.*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.1)
    reproduce.stop_runs({"job": proc}, signal.SIGTERM, grace_s=60)
    assert proc.returncode == 75
    assert len(list(tmp_path.glob("checkpointed.*"))) == processes


@pytest.mark.timeout(600)
def test_smoke_table_end_to_end(tmp_path):
    """The smoke spec runs 4 tiny real trainings, writes its table and .json, and names its data."""
    out = subprocess.run([PYTHON, str(REPO_ROOT / "experiments/reproduce.py"), "smoke_baselines", "--fresh"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=580)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (REPO_ROOT / "runs/smoke/smoke_baselines.md").read_text()
    numbers = json.loads((REPO_ROOT / "runs/smoke/smoke_baselines.json").read_text())
    assert "1,000 training images, evaluated on 500 test images" in table
    per_seed = numbers["rows"]["SWA"]["per_seed"]
    assert set(per_seed) == {"0", "1"} and all(0 <= v <= 100 for v in per_seed.values())
    claim = numbers["claims"][0]
    assert claim["per_seed"] == {k: pytest.approx(claim["a"][k] - claim["b"][k]) for k in claim["a"]}
    runs = REPO_ROOT / "runs/reproduce/smoke_baselines"
    for label in ("SGD", "SWA"):
        for seed in (0, 1):
            run = json.loads((runs / f"{label}-s{seed}" / "summary.json").read_text())
            assert numbers["rows"][label]["per_seed"][str(seed)] == pytest.approx(100 * run["final"]["output/acc"])
