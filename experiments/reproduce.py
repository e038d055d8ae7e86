"""Regenerate a results table: run every (row, seed) that is not already done, then write it.

    ./run.sh reproduce baselines            # configs/reproduce/baselines.yaml -> results/...
    ./run.sh reproduce all                  # every headline table in turn, then the summary
    ./run.sh reproduce summary              # only results/README.md, from the tables' .json files
    ./run.sh reproduce pilot_swap           # a pilot (tuning on a validation split); not in `all`
    ./run.sh reproduce baselines --no-records   # train it here, ignoring the committed run records
    python experiments/reproduce.py swap --jobs 2 --fresh

A table spec (configs/reproduce/<name>.yaml) lists rows (label, config, overrides), seeds,
processes per run, paired differences and the claims it tests (experiments/tables.py). A row
`{label: LB, from_table: swap}` is another table's runs: an ablation table compares against the
main table's baseline without training it twice, and its wall time counts only its own runs.

Runs live in runs/reproduce/<name>/<label>-s<seed>/ (label spaces as _) and are kept between invocations:
- a finished run is reused when its config and code match this checkout (the rule, with its result-neutral commits,
  is experiments/reuse.py); otherwise it is moved aside to runs/reproduce/<name>/.stale/ (never deleted) and run
  again, and the move is printed;
- a killed or preempted run resumes from its latest checkpoint under the same two conditions: so does `reproduce`.
Across machines: each finished run also leaves a record in results/run_records/<name>/<run>/
(summary, config, run info, metrics, TensorBoard events, its load samples; model weights only
where the spec's `record_weights` asks, for the figures that need them). Records are small and
committed, so a table too long for one machine session is finished by the next: a run whose
directory is missing is restored from its record (not with --no-records), then reused under the
same two conditions.
Runs go seed by seed (every row of seed 0, then of seed 1, ...), so a table stopped halfway
already holds complete comparisons.
Runs execute `--jobs` at a time (default: as many as fit the cores, one thread per process),
and a progress bar shows the runs left and an ETA. The table records how the cores were shared:
jobs at a time, other tables running at the same moment, and the load average.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import reuse, tables  # noqa: E402
from experiments import summary as summary_page  # noqa: E402
from experiments.processes import last_epoch, launch_command, stop_runs  # noqa: E402
from experiments.provenance import Sharing, provenance, run_cpus, table_wall_s  # noqa: E402
from swa_lib.config import ConfigError, load_config  # noqa: E402
from swa_lib.workload import model_names  # noqa: E402

SPECS = ROOT / "configs" / "reproduce"
RUNS = ROOT / "runs" / "reproduce"
RECORDS = ROOT / "results" / "run_records"


class Job:
    """One (row, seed) run of a table."""

    def __init__(self, spec: dict, name: str, row: dict, seed: int):
        self.row, self.seed, self.label = row, seed, row["label"]
        self.table = row.get("from_table", name)  # whose run this is (tables.load_spec)
        self.dir = RUNS / self.table / tables.run_dir_name(self.label, seed)
        self.record = RECORDS / self.table / tables.run_dir_name(self.label, seed)
        self.recorded = spec["output"].startswith("results/")  # smoke tables (under runs/) leave no record
        # The figures that need weights (swap_plots.error_plane) read the first seed's only.
        self.keep_weights = bool(row.get("record_weights")) and seed == row.get(
            "weights_seed", row.get("seeds", spec["seeds"])[0])
        self.entry = row.get("entry", spec["entry"])
        self.processes = row.get("processes", spec.get("processes", 1))
        self.overrides = [f"run.seed={seed}", "run.progress=false", *row.get("overrides", [])]
        self.config = load_config(ROOT / row["config"], self.overrides, model_names=model_names())
        self.cost = self.config.schedule.epochs * row.get("cost_factor", 1.0)  # for the ETA only
        self.seen: set[str] = set()  # other tables seen running while this run trained, this invocation

    @property
    def finished(self) -> bool:
        return (self.dir / "summary.json").exists()

    def progress(self) -> float:
        """The part of its cost done, for the bar: epochs logged over schedule.epochs (every method's budget)."""
        return self.cost * min(1.0, last_epoch(self.dir) / self.config.schedule.epochs)

    def mismatch(self) -> str | None:
        """Why the run directory cannot be reused or resumed, or None if it can (experiments/reuse.py)."""
        return reuse.run_mismatch(self.dir, self.config, self.entry, self.load_state(), self.processes)

    def record_mismatch(self) -> str | None:
        """The same question for the run's record: would this checkout reuse it on a new machine?"""
        load = self.record / "load.json"
        return reuse.run_mismatch(self.record, self.config, self.entry,
                                  json.loads(load.read_text()) if load.exists() else {}, self.processes)

    def save_record(self) -> None:
        """Copy what a finished run's table, figures and TensorBoard need into its record.
        Checkpoints and weight files (a few MB a run) are left out, except the last checkpoint's
        model weights where the spec's `record_weights` asks."""
        if not self.recorded:
            return
        tmp = self.record.with_name(self.record.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.dir, tmp, ignore=shutil.ignore_patterns("checkpoints", "*.pt"))
        if self.load_file.exists():
            shutil.copy2(self.load_file, tmp / "load.json")
        latest = self.dir / "checkpoints" / "latest.json"
        if self.keep_weights and latest.exists():
            tag = json.loads(latest.read_text())["tag"]
            (tmp / "checkpoints" / tag).mkdir(parents=True)
            shutil.copy2(latest, tmp / "checkpoints" / "latest.json")
            for f in sorted((self.dir / "checkpoints" / tag).glob("rank*.pt")):
                state = torch.load(f, map_location="cpu", weights_only=False)
                workers = (state.get("strategy") or {}).get("workers")  # in-process workers' models
                if workers is None:
                    torch.save({"model": state["model"]}, tmp / "checkpoints" / tag / f.name)
                else:  # one file a worker
                    for j, model in enumerate(workers["models"]):
                        torch.save({"model": model}, tmp / "checkpoints" / tag / f"{f.stem}-worker{j}.pt")
        shutil.rmtree(self.record, ignore_errors=True)
        tmp.rename(self.record)

    def restore_record(self) -> bool:
        """Recreate a missing run directory from its record (e.g. on a new machine); True if done."""
        if self.dir.exists() or not (self.record / "summary.json").exists():
            return False
        shutil.copytree(self.record, self.dir, ignore=shutil.ignore_patterns("load.json"))
        if (self.record / "load.json").exists():
            shutil.copy2(self.record / "load.json", self.load_file)
        return True

    @property
    def load_file(self) -> Path:
        """Load-average samples taken while this run trained (kept beside its log)."""
        return self.dir.parent / f"{self.dir.name}.load.json"

    def load_state(self) -> dict:
        """The run's load file: load samples, concurrent tables, layout, modified paths at its starts."""
        return json.loads(self.load_file.read_text()) if self.load_file.exists() else {"load": [], "tables": []}

    def record_load(self, at_once: int, together: int | None = None) -> None:
        """One load sample; `together`: this table's runs training at this moment, this one included."""
        state = self.load_state()
        state.update(at_once=at_once, threads=self.threads)
        state["load"].append(round(os.getloadavg()[0], 2))
        if together is not None:
            state.setdefault("together", []).append(together)
        state["tables"] = sorted(set(state["tables"]) | self.seen)
        self.load_file.write_text(json.dumps(state))

    def note_start(self, at_once: int) -> None:
        """Keep, in the run's load file, its layout (runs at a time, threads per process) and the
        tracked files modified at this (re)start. A run whose commit reads '-dirty' stays reusable if
        none of them is code (`mismatch`): an edited README or table during a long table must not
        cost its runs. Written at the start, so a run that ends before its first load sample has both."""
        if not self.dir.exists():  # a new run: a load file left by an earlier one is not its own
            self.load_file.unlink(missing_ok=True)
        state = self.load_state()
        state.update(at_once=at_once, threads=self.threads)
        state["dirty_paths"] = sorted(set(state.get("dirty_paths", [])) | set(reuse.modified_paths(ROOT)))
        self.load_file.write_text(json.dumps(state))

    def start(self, threads: int, at_once: int) -> subprocess.Popen:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.dir.parent / f"{self.dir.name}.log"
        self.threads = threads
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = launch_command(self.entry, self.processes, self.row["config"], self.dir, self.overrides)
        self.started = time.perf_counter()
        self.note_start(at_once)
        with open(self.log, "a") as fh:
            fh.write(f"\n$ OMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
            fh.flush()
            # Its own session: a Ctrl-C in the terminal reaches reproduce only, which forwards it (stop_runs).
            return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)


def all_jobs(spec: dict, name: str) -> list[Job]:
    """Every (row, seed) of a table, seed by seed: a table stopped halfway holds whole comparisons."""
    seeds = sorted({s for row in spec["rows"] for s in row.get("seeds", spec["seeds"])})
    return [Job(spec, name, row, seed) for seed in seeds for row in spec["rows"]
            if seed in row.get("seeds", spec["seeds"])]


def move_aside(job: Job, why: str) -> None:
    stale = job.dir.parent / ".stale" / f"{job.dir.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    stale.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(job.dir), stale)
    if job.load_file.exists():  # its load samples, concurrent tables and modified paths are not the rerun's
        shutil.move(str(job.load_file), stale / "load.json")
    print(f"reproduce: moved {os.path.relpath(job.dir, ROOT)} aside to {os.path.relpath(stale, ROOT)}: {why}",
          flush=True)


def run_all(spec: dict, name: str, jobs_at_once: int | None, keep: str, sharing: Sharing) -> tuple[dict, int, int]:
    """Run what is missing; return ({(label, seed): summary}, runs at a time, threads per process).
    keep: "all" (runs here and committed records), "here" (--no-records) or "none" (--fresh)."""
    jobs = all_jobs(spec, name)
    # Before anything touches them (restore, move aside): a run directory trained twice at once breaks.
    waiting = [j for j in jobs if j.table != name and not j.finished]
    owners = {j.table for j in waiting} & sharing.running_tables(RUNS)  # in this checkout
    if owners:
        sys.exit(f"reproduce {name}: rows {', '.join(sorted({j.label for j in waiting if j.table in owners}))} "
                 f"are the runs of table(s) {', '.join(sorted(owners))}, which are running now and will train "
                 f"them; run this table again when they end")
    todo = []
    for job in jobs:
        if keep == "all" and job.restore_record():
            print(f"reproduce: restored {os.path.relpath(job.dir, ROOT)} from {os.path.relpath(job.record, ROOT)}",
                  flush=True)
        why = "--fresh" if keep == "none" and job.dir.exists() else (job.mismatch() if job.dir.exists() else None)
        if why:
            move_aside(job, why)
        if not job.finished:
            todo.append(job)
        elif not (job.record / "summary.json").exists():
            job.save_record()  # finished while an earlier invocation was being stopped, before it could record it
    cores = len(os.sched_getaffinity(0))
    width = max(j.processes for j in todo) if todo else 1
    at_once = jobs_at_once or max(1, cores // width)
    threads = max(1, cores // (at_once * width))
    print(f"reproduce {name}: {len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to run, "
          f"{at_once} at a time, {threads} thread(s) per process", flush=True)
    shown = {j: j.progress() for j in todo}  # the bar's part of each job to run: a resumed run starts part done
    part_done = sum(j.cost for j in jobs if j not in todo) + sum(shown.values())
    bar = tqdm(total=sum(j.cost for j in jobs), initial=part_done,
               desc=f"reproduce {name} ({len(todo)} runs left)", unit="ep", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} epochs [{elapsed}<{remaining}]")
    running: dict[Job, subprocess.Popen] = {}
    queue = list(todo)
    stopped: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stopped.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    while queue or running:
        if stopped:
            stop_runs(running, stopped[0])
            bar.close()
            again = "again with --no-records instead of --fresh" if keep == "none" else "again"
            print(f"reproduce: stopped by {signal.Signals(stopped[0]).name}; {len(running)} running run(s) asked to "
                  f"checkpoint and stop ({', '.join(j.dir.name for j in running) or 'none'}); run the same command "
                  f"{again} to resume (exit 75)", file=sys.stderr, flush=True)
            sys.exit(75)
        while queue and len(running) < at_once:
            job = queue.pop(0)
            running[job] = job.start(threads, at_once)
            sharing.sample(running)
        time.sleep(2)
        sharing.sample(running)
        for job, proc in list(running.items()):
            done = proc.poll() is not None
            step = (job.cost if done else job.progress()) - shown[job]
            if step > 0:
                bar.update(step)
                shown[job] += step
            if done or len(sharing.loads) % 15 == 0:  # about every 30 s and at its end: what shared its cores
                job.record_load(at_once, together=len(running))
            if not done:
                continue
            del running[job]
            sharing.sample(running)
            if proc.returncode != 0 or not job.finished:
                stop_runs(running, signal.SIGTERM)  # they checkpoint; the next invocation resumes them
                tail = job.log.read_text().splitlines()[-15:]
                sys.exit(f"reproduce: run {job.dir.name} failed (exit {proc.returncode}); last lines of "
                         f"{job.log}:\n" + "\n".join(tail))
            job.save_record()
            bar.set_description(f"reproduce {name} ({len(queue) + len(running)} runs left)")
    bar.close()
    for s, handler in previous.items():
        signal.signal(s, handler)
    return {(j.label, j.seed): json.loads((j.dir / "summary.json").read_text()) for j in jobs}, at_once, threads


def make_plots(spec: dict, name: str, summaries: dict) -> list[str]:
    """Call each `plots:` entry ("module:function"); see experiments/swap_plots.py for the contract."""
    import importlib

    lines = []
    for entry in spec.get("plots", []):
        module, function = entry.split(":")
        plot = getattr(importlib.import_module(module), function)
        for item in plot(spec, summaries, RUNS / name, ROOT / "results"):
            if isinstance(item, str):
                lines += ["", item]
                continue
            caption, path = item
            rel = Path(path).resolve().relative_to((ROOT / spec["output"]).parent.resolve())
            lines += ["", f"![{caption}]({rel.as_posix()})", "", f"*{caption}* (`{entry}`)"]
    return lines


def finished_runs(spec: dict, name: str) -> dict:
    """Every run's summary (for --render-only), whatever code it ran; a run directory holding another
    config or process count (left from before its row changed) is moved aside for the record."""
    jobs, moved = all_jobs(spec, name), {}
    for job in jobs:
        if job.dir.exists() and (why := reuse.identity_mismatch(job.dir, job.config, job.processes)):
            move_aside(job, why)
            moved[job] = f" (the run there was moved aside: {why})"
        job.restore_record()
    missing = [j.dir.name + moved.get(j, "") for j in jobs if not j.finished]
    if missing:
        sys.exit(f"reproduce: --render-only needs every run finished; missing: {', '.join(missing)}")
    other = [f"{j.dir.name} ({why})" for j in jobs if (why := reuse.identity_mismatch(j.dir, j.config, j.processes))]
    if other:
        sys.exit(f"reproduce: --render-only found runs that are not the ones the spec asks for: {'; '.join(other)}")
    return {(j.label, j.seed): json.loads((j.dir / "summary.json").read_text()) for j in jobs}


def reproduce(name: str, jobs: int | None, keep: str = "all", render_only: bool = False) -> Path:
    spec = tables.load_spec(name, SPECS)
    start = time.perf_counter()
    sharing = Sharing(name, RUNS)
    try:
        if render_only:
            summaries, at_once, threads = finished_runs(spec, name), jobs or 0, 0
        else:
            summaries, at_once, threads = run_all(spec, name, jobs, keep, sharing)
    finally:
        sharing.close()
    elapsed = time.perf_counter() - start
    runs = {(j.label, j.seed): j for j in all_jobs(spec, name)}
    # Rows from another table (tables.load_spec) count in that table's time, not in this one's.
    own = {k: v for k, v in summaries.items() if runs[k].table == name}
    table_s = table_wall_s(own, {k: (runs[k].dir, runs[k].load_file) for k in own}, at_once)
    dir_of = {(j.label, j.seed): j.dir for j in runs.values()}
    lines = provenance(spec, name, lambda *key: dir_of[key], summaries, elapsed, at_once, threads, sharing, table_s)
    markdown, numbers = tables.render(spec, summaries, lines, make_plots(spec, name, summaries),
                                      cpus=run_cpus(lambda *key: dir_of[key], summaries))
    numbers.update(spec=name, output=spec["output"], elapsed_s=elapsed,
                   run_wall_s=sum(s["final"]["wall_s"] for s in summaries.values()),
                   table_wall_s=table_s, jobs_at_once=at_once,
                   shared_with=sorted(sharing.others), date=dt.date.today().isoformat())
    out = ROOT / spec["output"]
    tables.write(out, markdown, numbers)
    print(out.read_text())
    print(f"wrote {out.relative_to(ROOT)}; TensorBoard: ./run.sh tensorboard runs/reproduce/{name}")
    return out


def out_of_date(name: str) -> list[str]:
    """Why this checkout would not reuse each recorded run of a table (empty: all reusable)."""
    jobs = all_jobs(tables.load_spec(name, SPECS), name)
    return [why for job in jobs if (job.record / "summary.json").exists() and (why := job.record_mismatch())]


def headline_specs() -> list[str]:
    """The tables of `all`, those that take rows from other tables (from_table) after the rest."""
    names = [p.stem for p in SPECS.glob("*.yaml") if not p.stem.startswith(("pilot_", "smoke_"))]
    borrows = {n: any("from_table" in r for r in tables.load_spec(n, SPECS)["rows"]) for n in names}
    return sorted(names, key=lambda n: (borrows[n], n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a spec in configs/reproduce/, 'all' (every headline table, then the "
                                      "summary) or 'summary' (results/README.md only)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: as many as the cores hold)")
    parser.add_argument("--fresh", dest="keep", action="store_const", const="none", default="all",
                        help="move every existing run aside and run it again")
    parser.add_argument("--no-records", dest="keep", action="store_const", const="here",
                        help="train every run this checkout has not: restore none from results/run_records/ (a "
                             "fresh clone trains the whole table; killed, the same command resumes it)")
    parser.add_argument("--render-only", action="store_true",
                        help="write the table from the finished runs as they are, without checking that "
                             "their code matches this checkout (their commits are listed); a run directory "
                             "holding another config or process count is moved aside for the run's record")
    args = parser.parse_args()
    known = sorted(p.stem for p in SPECS.glob("*.yaml"))
    if args.table not in (*known, "all", "summary"):
        print(f"reproduce: no table {args.table!r}; known: {', '.join(known)}, all, summary", file=sys.stderr)
        return 2
    try:
        names = headline_specs() if args.table == "all" else [] if args.table == "summary" else [args.table]
        for name in names:
            reproduce(name, args.jobs, args.keep, args.render_only)
    except ConfigError as err:
        print(f"reproduce: a row's config is invalid: {err}", file=sys.stderr)
        return 2
    except tables.SpecError as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 2
    if args.table in ("all", "summary"):
        stale = {name: out_of_date(name) for name in headline_specs()}
        # By name, so an ablation's claims follow those of the table it tests.
        print(f"wrote {summary_page.write(ROOT, sorted(headline_specs()), stale).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
