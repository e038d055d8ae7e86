"""Regenerate a results table from scratch: every (method, seed) run, then the markdown.

    ./run.sh reproduce baselines            # configs/reproduce/baselines.yaml
    ./run.sh reproduce all                  # every spec in configs/reproduce/, in turn
    python experiments/reproduce.py baselines --reuse   # keep finished runs, redo the rest

A table spec (configs/reproduce/<name>.yaml) lists the rows (label, config, overrides),
the seeds, how many processes each run gets, and which paired differences to report.
Run directories (TensorBoard included) go under runs/reproduce/<name>/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swa_lib.run_log import git_commit, library_versions, machine_description  # noqa: E402


def launch_command(entry: str, processes: int, config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, str(ROOT / entry), "--config", str(ROOT / config), "--run-dir", str(run_dir), *overrides]
    if processes > 1:
        flags = ["--oversubscribe", "--bind-to", "none", "-x", "PATH", "-x", "PYTHONPATH"]
        if os.geteuid() == 0:
            flags.append("--allow-run-as-root")
        cmd = ["mpirun", *flags, "-np", str(processes), *cmd]
    return cmd


def run_all(spec: dict, name: str, reuse: bool) -> dict:
    base = ROOT / "runs" / "reproduce" / name
    if base.exists() and not reuse:
        shutil.rmtree(base)
    jobs = [(row, seed) for row in spec["rows"] for seed in row.get("seeds", spec["seeds"])]  # a row may cut seeds
    summaries: dict = {}
    bar = tqdm(jobs, desc=f"reproduce {name}", unit="run", dynamic_ncols=True)
    for row, seed in bar:
        run_dir = base / f"{row['label']}-s{seed}"
        bar.set_postfix_str(run_dir.name)
        if not (reuse and (run_dir / "summary.json").exists()):
            overrides = [f"run.seed={seed}", "run.progress=false", *row.get("overrides", [])]
            cmd = launch_command(row.get("entry", spec["entry"]), row.get("processes", spec.get("processes", 1)),
                                 row["config"], run_dir, overrides)
            log = base / f"{run_dir.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
            if rc != 0:
                tail = log.read_text().splitlines()[-15:]
                sys.exit(f"reproduce: run {run_dir.name} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))
        summaries[(row["label"], seed)] = json.loads((run_dir / "summary.json").read_text())
    return summaries


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def make_plots(spec: dict, name: str, summaries: dict) -> list[str]:
    """Call each `plots:` entry ("module:function", importable from the repo root) and embed its figures.

    A plot function takes (spec, summaries, run_base, results_dir), where summaries maps
    (label, seed) to a run's summary.json, and returns [(caption, png_path), ...]; an item may
    also be a markdown string (e.g. a table derived from the runs' histories), kept as it is.
    """
    lines = []
    for entry in spec.get("plots", []):
        module, function = entry.split(":")
        plot = getattr(importlib.import_module(module), function)
        for item in plot(spec, summaries, ROOT / "runs" / "reproduce" / name, ROOT / "results"):
            if isinstance(item, str):
                lines += ["", item]
                continue
            caption, path = item
            rel = Path(path).resolve().relative_to((ROOT / spec["output"]).parent.resolve())
            lines += ["", f"![{caption}]({rel.as_posix()})", "", f"*{caption}* (`{entry}`)"]
    return lines


def write_table(spec: dict, name: str, summaries: dict, command: str, elapsed_s: float, commit: str) -> Path:
    seeds, rows = spec["seeds"], spec["rows"]
    extra = spec.get("extra_columns", {})  # title -> summary metric, e.g. the SGD iterate of an SWA run
    error = spec.get("report", "accuracy") == "error"  # SWALP's tables are in test error
    as_pct = (lambda a: 100 * (1 - a)) if error else (lambda a: 100 * a)
    what = "test error %" if error else "test acc %"
    lines = [f"# {spec['title']}", "", spec.get("description", "").strip(), "",
             f"{what[:-2].capitalize()} (%) and wall time (s): mean ± sample std over seeds {seeds}"
             + ("; rows with fewer seeds list them" if any("seeds" in r for r in rows) else "") + ".", "",
             f"| method | {what} | " + "".join(f"{t} | " for t in extra) + f"wall time s | per-seed {what} |",
             "|---|---|" + "---|" * len(extra) + "---|---|"]
    acc = {}
    for row in rows:
        label = row["label"]
        final = [summaries[(label, s)]["final"] for s in row.get("seeds", seeds)]
        acc[label] = [as_pct(f["output/acc"]) for f in final]
        cells = "".join((f"{mean_std([as_pct(f[m]) if m.endswith('/acc') else f[m] for f in final])} | "
                         if all(m in f for f in final) else "– | ") for m in extra.values())
        label_seeds = f" (seeds {row['seeds']})" if "seeds" in row else ""
        lines.append(f"| {label}{label_seeds} | {mean_std(acc[label])} | {cells}{mean_std([f['wall_s'] for f in final])} | "
                     f"{', '.join(f'{a:.2f}' for a in acc[label])} |")
    if spec.get("paired"):
        lines += ["", "Paired differences (same seed; percentage points):", "",
                  "| difference | mean ± std | per seed |", "|---|---|---|"]
        def values(ref: str) -> list[float]:  # "label" (its result) or "label@metric" (any final metric)
            label, _, metric = ref.partition("@")
            return acc[label] if not metric else [as_pct(summaries[(label, s)]["final"][metric]) for s in seeds]

        for a, b, *title in spec["paired"]:  # an optional third entry names the difference
            diffs = [x - y for x, y in zip(values(a), values(b))]
            what_diff = title[0] if title else f"{a} − {b}"
            lines.append(f"| {what_diff} | {mean_std(diffs)} | {', '.join(f'{d:+.2f}' for d in diffs)} |")
    lines += make_plots(spec, name, summaries)
    versions = library_versions()
    lines += ["", "## Provenance", "",
              f"- command: `{command}` (total {elapsed_s / 60:.1f} min)",
              f"- commit: `{commit}` (when the runs started)",
              f"- machine: {machine_description()}",
              f"- date: {dt.date.today().isoformat()}",
              f"- versions: torch {versions['torch']}, torchvision {versions['torchvision']}, "
              f"horovod {versions['horovod']}, mpi4py {versions['mpi4py']}",
              f"- table spec: `configs/reproduce/{name}.yaml`; configs: "
              + ", ".join(f"`{r['config']}`" + (f" + `{' '.join(r['overrides'])}`" if r.get("overrides") else "")
                          for r in rows),
              f"- run directories with TensorBoard logs: `runs/reproduce/{name}/` "
              f"(`tensorboard --logdir runs/reproduce/{name}`)"]
    out = ROOT / spec["output"]
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hand-written "## Discussion" reads the numbers; it is kept when the table is re-rendered.
    old = out.read_text() if out.exists() else ""
    discussion = old[old.index("\n## Discussion"):] if "\n## Discussion" in old else ""
    out.write_text("\n".join(lines) + "\n" + discussion)
    return out


def reproduce(table: str, reuse: bool) -> Path:
    spec = yaml.safe_load((ROOT / "configs" / "reproduce" / f"{table}.yaml").read_text())
    start = time.perf_counter()
    commit = git_commit()  # the code the runs use; later commits must not be credited with them
    summaries = run_all(spec, table, reuse)
    command = f"./run.sh reproduce {table}" + (" --reuse" if reuse else "")
    out = write_table(spec, table, summaries, command, time.perf_counter() - start, commit)
    print(out.read_text())
    print(f"wrote {out.relative_to(ROOT)}; TensorBoard: tensorboard --logdir runs/reproduce/{table}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="name of a spec in configs/reproduce/, or 'all' for every spec in turn")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    args = parser.parse_args()
    known = sorted(p.stem for p in (ROOT / "configs" / "reproduce").glob("*.yaml"))
    if args.table != "all" and args.table not in known:
        print(f"reproduce: no table {args.table!r}; known: {', '.join(known)}, or all", file=sys.stderr)
        return 2
    written = [reproduce(table, args.reuse) for table in (known if args.table == "all" else [args.table])]
    if len(written) > 1:
        print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
