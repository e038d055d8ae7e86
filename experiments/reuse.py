"""When a finished or interrupted run of a table may be reused (experiments/reproduce.py).

A run is reusable when it ran on as many processes as asked, its resolved config equals the one
asked for (keys that only say where files live, swa_lib.config.IDENTITY_NEUTRAL, aside) and the
code it ran does not differ from HEAD in swa_lib/, models/, data/ or its entry point, except by
commits declared result-neutral in experiments/result_neutral.yaml. A run from a modified tree
counts only if none of the modified files was code.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from swa_lib.config import IDENTITY_NEUTRAL, Config, flatten, to_dict
from swa_lib.run_log import run_commits

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = ("swa_lib", "models", "data")
NEUTRAL = ROOT / "experiments" / "result_neutral.yaml"


def result_neutral() -> dict[str, str]:
    """{full commit hash: why} of the commits declared not to change what any run computes."""
    entries = yaml.safe_load(NEUTRAL.read_text()) if NEUTRAL.exists() else None
    return {str(e["commit"]): str(e["why"]) for e in (entries or {}).get("commits") or []}


def code_changes_since(commit: str, paths: list[str]) -> list[str] | None:
    """The commits between `commit` and HEAD that touch `paths`, oldest first; None when `commit`
    is not an ancestor of HEAD (another branch, or unknown here): then only a plain diff can tell."""
    if subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT,
                      capture_output=True).returncode != 0:
        return None
    out = subprocess.run(["git", "rev-list", "--reverse", "--full-history", f"{commit}..HEAD", "--", *paths],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def run_mismatch(run_dir: Path, want: Config, entry: str, load_state: dict, processes: int) -> str | None:
    """Why the run in `run_dir` (a run directory or its record) cannot be reused, or None if it can.
    The process count is part of a run's identity: the same config on 2 or 4 processes splits the
    global batch differently (batch norm's batch, the data shards), so it is a different run."""
    try:
        commits = run_commits(json.loads((run_dir / "run_info.json").read_text()))
    except (OSError, ValueError, KeyError):
        return "it has no readable config.yaml / run_info.json"
    # A resumed run is reusable only if the code of every start is HEAD's.
    return identity_mismatch(run_dir, want, processes) or next(
        filter(None, (code_mismatch(c, entry, load_state.get("dirty_paths")) for c in dict.fromkeys(commits))), None)


def identity_mismatch(run_dir: Path, want: Config, processes: int) -> str | None:
    """Why the run in `run_dir` is not the run asked for, whatever code it ran: another process count
    or another config. --render-only takes runs across code changes, never across these."""
    try:
        had = yaml.safe_load((run_dir / "config.yaml").read_text())
        world_size = json.loads((run_dir / "run_info.json").read_text()).get("world_size")
    except (OSError, ValueError):
        return "it has no readable config.yaml / run_info.json"
    if world_size != processes:
        return f"it ran on {world_size} processes, not {processes}"
    return config_mismatch(had, want)


def config_mismatch(had: dict | None, want: Config) -> str | None:
    """Which keys of a run's stored config.yaml differ from the config asked for, as run identities."""
    had = {k: v for k, v in flatten(had or {}).items() if k not in IDENTITY_NEUTRAL}
    want = {k: v for k, v in flatten(json.loads(json.dumps(to_dict(want)))).items()  # tuples -> lists
            if k not in IDENTITY_NEUTRAL}
    differing = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
    return f"its config differs in {', '.join(differing)}" if differing else None


def modified_paths(root: Path = ROOT) -> list[str]:
    """The checkout's modified tracked files, as plain paths. `git status --porcelain` without -z
    quotes a path that holds a space (every run directory name here), which no prefix test matches."""
    fields = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True).stdout.split("\0")
    paths, i = [], 0
    while i < len(fields):
        if fields[i]:
            paths.append(fields[i][3:])
            if "R" in fields[i][:2] or "C" in fields[i][:2]:  # -z: a rename's source is the next field
                i += 1
                paths.append(fields[i])
        i += 1
    return paths


def unquote(path: str) -> str:
    """A path as load files before modified_paths kept it: '"a b/c"' (git's C-style quoting) -> 'a b/c'."""
    if len(path) > 1 and path[0] == path[-1] == '"':
        return path[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode()
    return path


def code_mismatch(commit: str, entry: str, dirty_paths: list[str] | None) -> str | None:
    """Why code at `commit` (maybe '<hash>-dirty', with the tracked files then modified) is not
    HEAD's code for a run of `entry`, or None. The row's config file is not among the paths: the
    resolved config is compared exactly, and a comment in the file does not change a run."""
    paths = [*CODE_PATHS, entry]
    if commit.endswith("-dirty"):
        code = [d for d in map(unquote, dirty_paths or [])
                if any(d == p or d.startswith(p.rstrip("/") + "/") for p in paths)]
        if dirty_paths is None or code:
            return (f"it ran from a modified tree ({commit}"
                    + (f"; modified code: {', '.join(code)})" if code else "; which files, not recorded)"))
        commit = commit.removesuffix("-dirty")  # only files that are not code were modified
    if commit == "unknown":
        return "it ran from an unknown tree"
    if subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", *paths], cwd=ROOT,
                      capture_output=True).returncode == 0:
        return None
    undeclared = code_changes_since(commit, paths)
    if undeclared is None:
        return f"the code changed since its commit {commit[:10]} ({', '.join(paths)})"
    undeclared = [c for c in undeclared if c not in result_neutral()]
    return None if not undeclared else (
        f"the code changed since its commit {commit[:10]} ({', '.join(paths)}) in "
        f"{', '.join(c[:10] for c in undeclared)}, not declared result-neutral in {NEUTRAL.relative_to(ROOT)}")


def neutral_lines(commits: set[str], entries: set[str]) -> list[str]:
    """A provenance line naming the result-neutral commits that runs at `commits` were reused across."""
    paths = [*CODE_PATHS, *sorted(entries)]
    declared, used = result_neutral(), []
    for commit in sorted({c.removesuffix("-dirty") for c in commits} - {"unknown"}):
        for c in code_changes_since(commit, paths) or []:
            if c in declared and c not in used:
                used.append(c)
    if not used:
        return []
    return ["- code changed since some runs' commits only in commits declared result-neutral "
            f"(`{NEUTRAL.relative_to(ROOT)}`, which gives each one's reason and check): "
            + "; ".join(f"`{c[:10]}` ({declared[c].split('. ')[0].rstrip('.')})" for c in used)]
