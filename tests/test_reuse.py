"""Run reuse: a finished run (or its committed record) counts for a table only with the same config,
process count and code, across commits declared result-neutral, and with modified paths read exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from mpi_util import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import provenance, reproduce, reuse  # noqa: E402
from swa_lib.config import to_dict  # noqa: E402


def test_out_of_date_reads_the_records_as_a_new_machine_would(tmp_path, monkeypatch):
    """reproduce.out_of_date: a record is judged by the same rule as a run directory."""
    monkeypatch.setattr(reproduce, "RECORDS", tmp_path)
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    jobs = reproduce.all_jobs(spec, "smoke_baselines")
    assert reproduce.out_of_date("smoke_baselines") == []  # nothing recorded
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    for job, lr in zip(jobs[:2], (None, 0.5), strict=True):
        config = to_dict(job.config)
        if lr is not None:
            config["optim"]["lr"] = lr
        job.record.mkdir(parents=True)
        (job.record / "summary.json").write_text("{}")
        (job.record / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (job.record / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": head}))
    assert reproduce.out_of_date("smoke_baselines") == ["its config differs in optim.lr"]


def test_a_run_is_reused_only_with_the_same_config_and_code(tmp_path, monkeypatch):
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    monkeypatch.setattr(reproduce, "RUNS", tmp_path)
    job = reproduce.Job(spec, "smoke", spec["rows"][0], 0)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                           text=True).stdout.split()[0]

    def record(config: dict, commit: str) -> None:
        job.dir.mkdir(parents=True, exist_ok=True)
        (job.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": commit}))

    assert "no readable config" in job.mismatch()
    record(to_dict(job.config), head)
    assert job.mismatch() is None  # same config, same code: reusable
    # The same config on another process count is another run (batch norm's batch, the shards).
    (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes + 2, "git_commit": head}))
    assert job.mismatch() == f"it ran on {job.processes + 2} processes, not {job.processes}"
    changed = to_dict(job.config)
    changed["optim"]["lr"] = 0.5
    record(changed, head)
    assert job.mismatch() == "its config differs in optim.lr"
    moved = to_dict(job.config)
    moved["data"].update(root="/elsewhere", cache_dir="/another/cache")  # where files live, not what runs
    record(moved, head)
    assert job.mismatch() is None
    record(to_dict(job.config), head + "-dirty")
    assert "which files, not recorded" in job.mismatch()  # a run from before dirty paths were kept
    job.load_file.write_text(json.dumps({"load": [], "tables": [], "dirty_paths": ["README.md", "results/x.md"]}))
    assert job.mismatch() is None  # modified, but nothing that runs
    job.load_file.write_text(json.dumps({"dirty_paths": ["README.md", "swa_lib/loop.py", "experiments/summary.py"]}))
    assert job.mismatch() == f"it ran from a modified tree ({head}-dirty; modified code: swa_lib/loop.py)"
    job.load_file.write_text(json.dumps({"dirty_paths": ["swa_lib_notes.md"]}))  # a prefix of a path, not under it
    assert job.mismatch() is None
    job.load_file.unlink()
    monkeypatch.chdir(tmp_path)
    job.threads = 1
    job.note_start(at_once=2)  # what `start` keeps: the checkout's modified tracked files, whatever the cwd
    state = json.loads(job.load_file.read_text())
    assert set(state["dirty_paths"]) == set(reuse.modified_paths(REPO_ROOT))
    assert (state["at_once"], state["threads"]) == (2, 1)  # the layout, before any load sample
    job.load_file.unlink()
    record(to_dict(job.config), "unknown")
    assert job.mismatch() == "it ran from an unknown tree"
    record(to_dict(job.config), first)  # the first commit had none of today's code
    assert "the code changed since its commit" in job.mismatch()


def test_modified_paths_are_plain_paths_even_with_spaces_and_renames(tmp_path):
    """Run directories here have spaces in their names; git's default porcelain quotes such a path
    ('"swa_lib/a b.py"'), and a quoted code path would pass the reuse check's prefix test unseen."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "swa_lib").mkdir()
    for name in ("swa_lib/a b.py", "old name.txt", "same.txt"):
        (tmp_path / name).write_text("x\n")
    git("add", "-A")
    git("commit", "-qm", "base")
    assert reuse.modified_paths(tmp_path) == []
    (tmp_path / "swa_lib" / "a b.py").write_text("y\n")
    git("mv", "old name.txt", "new name.txt")
    assert sorted(reuse.modified_paths(tmp_path)) == ["new name.txt", "old name.txt", "swa_lib/a b.py"]
    # Load files written before this kept git's quoted form; both forms read as the same path.
    assert reuse.unquote('"swa_lib/a b.py"') == "swa_lib/a b.py" == reuse.unquote("swa_lib/a b.py")
    assert reuse.unquote('"caf\\303\\251 \\"q\\".md"') == 'caf\u00e9 "q".md'
    for dirty in (['"swa_lib/a b.py"'], ["swa_lib/a b.py"]):
        assert "modified code: swa_lib/a b.py" in reuse.code_mismatch("abc-dirty", "experiments/x.py", dirty)
    assert provenance._grouped({reuse.unquote('"results/a b/c.json"'), "README.md"}) == "README.md, results/ (1 file)"


def test_reuse_survives_only_commits_declared_result_neutral(tmp_path, monkeypatch):
    """A run stays reusable across a code change only if every commit since its own that touches
    code is declared in result_neutral.yaml, and only along HEAD's history; the table says which."""
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/smoke_baselines.yaml").read_text())
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    job = reproduce.Job(spec, "smoke", spec["rows"][0], 0)  # its config loads from the real checkout
    repo = tmp_path / "repo"
    (repo / "swa_lib").mkdir(parents=True)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    def commit(path: str, text: str) -> str:
        (repo / path).write_text(text)
        git("add", "-A")
        git("commit", "-qm", path)
        return git("rev-parse", "HEAD")

    def declare(*commits: str) -> None:
        (repo / "experiments").mkdir(exist_ok=True)
        (repo / "experiments" / "result_neutral.yaml").write_text(yaml.safe_dump(
            {"commits": [{"commit": c, "why": f"why {c[:4]}"} for c in commits]}))

    git("init", "-q")
    base = commit("swa_lib/loop.py", "a = 1\n")
    message = commit("swa_lib/errors.py", "msg = 'a clearer message'\n")
    commit("README.md", "not code\n")
    monkeypatch.setattr(reuse, "ROOT", repo)
    monkeypatch.setattr(reuse, "NEUTRAL", repo / "experiments" / "result_neutral.yaml")
    job.dir.mkdir(parents=True)
    (job.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(job.config), sort_keys=False))
    (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": base}))
    entries = {job.entry}

    assert job.mismatch() == (f"the code changed since its commit {base[:10]} (swa_lib, models, data, "
                              f"{job.entry}) in {message[:10]}, not declared result-neutral in "
                              "experiments/result_neutral.yaml")
    assert reuse.neutral_lines({base}, entries) == []
    declare(message)
    assert job.mismatch() is None
    line, = reuse.neutral_lines({base + "-dirty"}, entries)
    assert f"`{message[:10]}` (why {message[:4]})" in line
    real = commit("swa_lib/loop.py", "a = 2\n")  # an undeclared change after a declared one
    assert job.mismatch().endswith(f"in {real[:10]}, not declared result-neutral in experiments/result_neutral.yaml")
    git("checkout", "-q", "-b", "side", base)  # a run from another branch: only the plain diff can tell
    side = commit("swa_lib/loop.py", "a = 3\n")
    git("checkout", "-q", "-")
    declare(message, real, side)
    assert job.mismatch() is None  # every commit since `base` on HEAD's history is declared
    (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": side}))
    assert job.mismatch() == f"the code changed since its commit {side[:10]} (swa_lib, models, data, {job.entry})"
    # A run resumed at HEAD after starting on `side`: the earlier start's code counts too.
    (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": real,
                                                       "earlier_starts": [{"git_commit": side}]}))
    assert job.mismatch() == f"the code changed since its commit {side[:10]} (swa_lib, models, data, {job.entry})"
    (job.dir / "run_info.json").write_text(json.dumps({"world_size": job.processes, "git_commit": real,
                                                       "earlier_starts": [{"git_commit": base}]}))
    assert job.mismatch() is None
