"""experiments/provenance.py: what a table's provenance lines say about its runs' dates and commits."""
from __future__ import annotations

import datetime as dt
import json
import sys
from types import SimpleNamespace

from mpi_util import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments.provenance import provenance  # noqa: E402


def _lines(tmp_path, runs: dict, elapsed_s: float) -> str:
    """Provenance of a one-row table whose runs (seed -> (commit, started, load state)) are on disk."""
    summaries = {}
    for seed, (commit, started, state) in runs.items():
        run = tmp_path / f"A-s{seed}"
        run.mkdir()
        *earlier, commit = commit.split("+")  # "a+b": started at a, resumed at b
        (run / "run_info.json").write_text(json.dumps({
            "git_commit": commit, "started": started.isoformat(timespec="seconds"), "machine": "vm",
            "config": {"run": {"precision": "fp32"}}, "earlier_starts": [{"git_commit": c} for c in earlier]}))
        if state is not None:
            (tmp_path / f"A-s{seed}.load.json").write_text(json.dumps({"load": [1.0], "tables": [], **state}))
        summaries[("A", seed)] = {"final": {"wall_s": 10.0}, "train_images": 50000, "eval_images": 10000}
    spec = {"rows": [{"label": "A", "config": "configs/x.yaml"}]}
    sharing = SimpleNamespace(loads=[], others=set())
    return "\n".join(provenance(spec, "t", lambda label, seed: tmp_path / f"{label}-s{seed}", summaries,
                                elapsed_s, 1, 1, sharing, 20.0))


def test_the_dirty_commit_names_what_was_modified_and_dates_say_which_runs_are_older(tmp_path):
    """A '-dirty' commit is followed by the modified files (grouped by folder), so a reader can see
    that only records were dirty; the dates line counts the runs that trained before this
    invocation, and says nothing of the kind when every run is its own (a table crossing midnight)."""
    now = dt.datetime.now()
    text = _lines(tmp_path, {
        0: ("abc", now - dt.timedelta(days=2), None),
        1: ("abc-dirty", now - dt.timedelta(minutes=5), {"dirty_paths": ["results/r/a.json", "results/r/b.json"]}),
        2: ("abc-dirty", now - dt.timedelta(minutes=2), {"dirty_paths": ["README.md", "results/r/a.json"]}),
    }, elapsed_s=600)
    assert "tracked files modified when those runs started: README.md, results/ (2 files))" in text, text
    assert "(1 of the 3 runs trained before this invocation" in text, text

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    text = _lines(fresh, {0: ("abc", now - dt.timedelta(days=1), None),  # runs on two dates, both of
                          1: ("abc-dirty", now - dt.timedelta(minutes=3), {})},  # this invocation
                  elapsed_s=2 * 86400)
    assert "trained before this invocation" not in text and "restored from" not in text, text
    assert "'-dirty': tracked files modified when those runs started: not recorded for every run" in text, text


def test_a_resumed_run_names_the_commit_of_every_start(tmp_path):
    now = dt.datetime.now()
    text = _lines(tmp_path, {0: ("abc+def", now, None), 1: ("def", now, None)}, elapsed_s=600)
    assert "- commit(s) of the runs: `abc`, `def`" in text, text


def test_an_invocation_that_trained_nothing_says_so_instead_of_its_minutes(tmp_path):
    long_ago = dt.datetime.now() - dt.timedelta(days=1)
    text = _lines(tmp_path, {0: ("abc", long_ago, None)}, elapsed_s=120)
    assert "(this invocation trained no run: the table was written from runs finished earlier" in text, text
    assert "this invocation: 2.0 min" not in text
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert "(this invocation: 2.0 min; " in _lines(fresh, {0: ("abc", dt.datetime.now(), None)}, elapsed_s=120)
