"""Provenance lines of a reproduced table (experiments/reproduce.py): the command, the table's wall
time, the runs' commits, machines and dates, what shared the cores, data, precision and versions."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from experiments.reuse import neutral_lines, unquote
from swa_lib.run_log import library_versions, machine_description, run_commits


def run_cpus(dir_of, keys) -> dict:
    """{(label, seed): the CPU family/model/stepping its run trained on, "?" where not recorded}."""
    cpus = {}
    for label, seed in keys:
        info = json.loads((dir_of(label, seed) / "run_info.json").read_text())
        cpus[(label, seed)] = info.get("numerics", {}).get("cpu", {}).get("family_model_stepping") or "?"
    return cpus


def provenance(spec: dict, name: str, dir_of, summaries: dict, elapsed_s: float, at_once: int, threads: int,
               sharing, table_s: float) -> list[str]:
    """The provenance lines of a table: command, wall time, commits, machines, dates, sharing, data."""
    infos = [json.loads((dir_of(label, seed) / "run_info.json").read_text())
             for label, seed in summaries]
    commits = sorted({c for i in infos for c in run_commits(i)})  # a resumed run: every start's
    machines: dict[str, int] = {}
    for i in infos:
        cpu = i.get("numerics", {}).get("cpu", {})
        key = i.get("machine", "unknown") + (f", CPU family/model/stepping {cpu['family_model_stepping']}"
                                             if cpu.get("family_model_stepping") else "")
        machines[key] = machines.get(key, 0) + 1
    dates = sorted(i.get("started", "unknown")[:10] for i in infos)
    began = dt.datetime.now() - dt.timedelta(seconds=elapsed_s)
    earlier = sum(1 for i in infos if "started" in i and dt.datetime.fromisoformat(i["started"]) < began)
    data = sorted({(s.get("train_images"), s.get("eval_images"), s.get("eval_split", "test"))
                   for s in summaries.values()}, key=str)
    precision = sorted({str(i["config"]["run"].get("precision", "fp32")) for i in infos})
    v = library_versions()
    # Load and concurrent tables while each run trained (recorded per run, so reused runs count too).
    loads, others = list(sharing.loads), set(sharing.others)
    layouts = {(at_once, threads)} if threads else set()
    dirty: set[str] | None = set()  # tracked files modified when the '-dirty' runs started
    for (label, seed), info in zip(summaries, infos):
        f = dir_of(label, seed).with_name(dir_of(label, seed).name + ".load.json")
        state = json.loads(f.read_text()) if f.exists() else {}
        if info["git_commit"].endswith("-dirty"):
            had = state.get("dirty_paths")
            dirty = None if dirty is None or had is None else dirty | set(map(unquote, had))
        if state:
            loads += state["load"]
            others |= set(state["tables"])
            if "at_once" in state:  # load files written before the layout was kept at a run's start lack it
                layouts.add((state["at_once"], state["threads"]))
    others = ", ".join(sorted(others - {name})) or "none"
    layout = " / ".join(f"{a} run(s) at a time, {t} thread(s) per process" for a, t in sorted(layouts))
    borrowed = {r["label"]: r["from_table"] for r in spec["rows"] if "from_table" in r}  # tables.load_spec
    run_s = sum(s["final"]["wall_s"] for (label, _), s in summaries.items() if label not in borrowed)
    invocation = (f"this invocation: {elapsed_s / 60:.1f} min; runs reused from earlier invocations keep their "
                  f"own wall times" if earlier < len(infos) else "this invocation trained no run: the table was "
                  "written from runs finished earlier, whose wall times follow")
    return [f"- command: `./run.sh reproduce {name}` ({invocation})",
            f"- wall time of the table: {table_s / 3600:.2f} h ({'its own runs; ' if borrowed else ''}each run's wall "
            f"time divided by the runs that shared the cores with it; the runs' own wall times sum to "
            f"{run_s / 3600:.2f} h)",
            f"- commit(s) of the runs: {', '.join(f'`{c}`' for c in commits)}" + (
                f" ('-dirty': tracked files modified when those runs started: {_grouped(dirty)})"
                if any(c.endswith("-dirty") for c in commits) else ""),
            *neutral_lines(set(commits), {row.get("entry", spec.get("entry")) for row in spec["rows"]} - {None}),
            "- machine(s) of the runs: " + "; ".join(
                f"{m} ({n} run(s))" for m, n in sorted(machines.items())),
            f"- run dates: {min(dates)} to {max(dates)}" + (
                f" ({earlier} of the {len(infos)} runs trained before this invocation: reused from an earlier "
                "one, or restored from results/run_records/, possibly from another machine)" if earlier else ""),
            f"- this invocation's machine: {machine_description()}",
            f"- cores shared: {layout or 'not recorded'}; other tables running "
            f"at the same time: {others}; load average (1 min) during the runs: " + (
                f"{min(loads):.1f}-{max(loads):.1f} (median {sorted(loads)[len(loads) // 2]:.1f}; 2 cores)"
                if loads else "not recorded"),
            "- data: " + "; ".join(f"{tr:,} training images, evaluated on {ev:,} {split} images"
                                    for tr, ev, split in data),
            f"- precision: {', '.join(precision)}",
            f"- table written: {dt.date.today().isoformat()}",
            f"- versions: torch {v['torch']}, torchvision {v['torchvision']}, horovod {v['horovod']}, "
            f"mpi4py {v['mpi4py']}",
            f"- table spec: `configs/reproduce/{name}.yaml`; configs: "
            + ", ".join(f"`{r['config']}`" + (f" + `{' '.join(r['overrides'])}`" if r.get("overrides") else "")
                        for r in spec["rows"]),
            *(["- rows taken from other tables (their runs, reused; their wall time counts there, not in this "
               "table's): " + "; ".join(f"{', '.join(labels)} from `{t}` (`./run.sh reproduce {t}`)"
                                         for t, labels in _by_table(borrowed).items())] if borrowed else []),
            f"- run directories with TensorBoard logs: `runs/reproduce/{name}/` "
            + "".join(f"and `runs/reproduce/{t}/` " for t in _by_table(borrowed))
            + f"(`./run.sh tensorboard runs/reproduce/{name}`)"]


def _by_table(borrowed: dict[str, str]) -> dict[str, list[str]]:
    """{table: [row labels]} of the rows taken from other tables."""
    out: dict[str, list[str]] = {}
    for label, table in borrowed.items():
        out.setdefault(table, []).append(label)
    return out


def _grouped(paths: set[str] | None) -> str:
    """'results/ (12 files), README.md': modified paths by top-level folder; None: not recorded."""
    if paths is None:
        return "not recorded for every run"
    if not paths:
        return "none recorded"
    tops: dict[str, int] = {}
    for p in paths:
        top = p.split("/")[0] + ("/" if "/" in p else "")
        tops[top] = tops.get(top, 0) + 1
    return ", ".join(f"{t} ({n} file{'s' if n > 1 else ''})" if t.endswith("/") else t for t, n in sorted(tops.items()))


def run_span(run_dir: Path, summary: dict) -> tuple[float, float] | None:
    """When a run trained, (start, end) in seconds since the epoch: its run_info.json's start plus its
    wall time. None for a run started more than once (its wall time adds up every start's)."""
    f = run_dir / "run_info.json"
    info = json.loads(f.read_text()) if f.exists() else {}
    if "started" not in info or info.get("earlier_starts"):
        return None
    start = dt.datetime.fromisoformat(info["started"]).timestamp()
    return start, start + summary["final"]["wall_s"]


def own_share(span: tuple[float, float], spans: list) -> float:
    """The seconds of `span`, each divided by the runs of `spans` training at that moment."""
    cuts = sorted({*span, *(t for other in spans for t in other if span[0] < t < span[1])})
    return sum((hi - lo) / sum(1 for a, b in spans if a <= (lo + hi) / 2 < b) for lo, hi in zip(cuts, cuts[1:]))


def one_sitting(spans: list, gap_s: float = 120.0) -> bool:
    """Whether the runs trained in one stretch of time, each starting before the earlier ones ended."""
    if None in spans:
        return False
    end = None
    for start, stop in sorted(spans):
        if end is not None and start > end + gap_s:
            return False
        end = stop if end is None else max(end, stop)
    return True


def table_wall_s(summaries: dict, runs: dict, at_once: int) -> float:
    """Wall time of the whole table as its runs were run, counting each moment once: each run's wall
    time divided by the number of the table's runs training beside it (itself included), from
    - the mean of its load file's samples of that number (runs recorded from commit b80906a on);
    - else, where every run started once and all trained in one sitting (no gap between them), the
      runs' spans (run_info.json's start + wall time): each run's seconds divided by the runs
      training at each moment. A table trained over several sittings may have had its layout's other
      slots filled by runs no longer in it (a dropped row): its spans would count those runs whole;
    - else the layout's runs at a time (its load file's, else this invocation's).
    Unlike one invocation's elapsed time, it counts runs that an earlier invocation (or session)
    trained and this one reused. summaries and runs ((run directory, load file)) are keyed alike,
    by (row label, seed)."""
    states = {key: json.loads(f.read_text()) if (f := runs[key][1]).exists() else {} for key in summaries}
    # Runs without samples (older code), with each other: one invocation records all or none.
    spans = [run_span(runs[key][0], summaries[key]) for key in summaries if not states[key].get("together")]
    sitting = one_sitting(spans)
    total = 0.0
    for key, summary in summaries.items():
        state = states[key]
        if together := state.get("together"):
            total += summary["final"]["wall_s"] / (sum(together) / len(together))
        elif sitting:
            total += own_share(run_span(runs[key][0], summary), spans)
        else:
            total += summary["final"]["wall_s"] / (state.get("at_once", at_once) or 1)
    return total


class Sharing:
    """What shared the cores while a table ran: other `reproduce` processes and the load average."""

    def __init__(self, name: str, runs: Path | None = None):
        # Machine-wide (outside the checkout), so tables run from other clones or worktrees count too.
        self.active = Path(os.environ.get("SWA_REPRODUCE_ACTIVE", Path.home() / ".cache/swa_lib/reproduce-active"))
        self.active.mkdir(parents=True, exist_ok=True)
        self.mine = self.active / f"{name}.{os.getpid()}"  # name.pid; a dead pid's file is ignored
        self.mine.write_text(name if runs is None else f"{name}\n{runs.resolve()}")  # and where its runs live
        self.others: set[str] = set()  # every other table seen during this invocation
        self.current: set[str] = set()  # those seen at the latest sample
        self.loads: list[float] = []  # sampled only while runs train: an invocation that trains none adds nothing

    def sample(self, running=()) -> None:
        """One load sample, and the tables running now; each running job (reproduce.Job) adds them to
        its own `seen`, so a run names only the tables that ran while it trained."""
        self.loads.append(os.getloadavg()[0])
        self.loads = self.loads[-10000:]
        self.current = self.running_tables()
        self.others |= self.current
        for job in running:
            job.seen |= self.current

    def running_tables(self, runs: Path | None = None) -> set[str]:
        """The tables other `reproduce` processes are running now (records nothing). With `runs`, only
        those whose run directories live there (this checkout's), or that did not say where."""
        tables = set()
        for f in self.active.iterdir():
            pid = int(f.suffix[1:]) if f.suffix[1:].isdigit() else None
            if f != self.mine and pid and Path(f"/proc/{pid}").exists():
                table, _, where = f.read_text().partition("\n")
                if runs is None or not where or Path(where) == runs.resolve():
                    tables.add(table)
        return tables

    def close(self) -> None:
        self.mine.unlink(missing_ok=True)
