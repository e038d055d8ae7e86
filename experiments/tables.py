"""Markdown and JSON for one results table, computed from its runs' summary.json files.

A table spec (configs/reproduce/<name>.yaml) refers to numbers with *refs*:

    "SWA"                   the row's result: its output model's final test accuracy
    "SWA@model/acc"         any key of the row's summary["final"] (here: the SGD iterate)
    "SWA@swa/acc@e12"       the evaluated model "swa" at the evaluation after epoch 12 (from the
                            run's history: SWA's budget-B point of a 1.5B run, for example)
    "cosine@ema/steps_to_final"   the first evaluated step at which "ema" reaches the final
                            accuracy of the same run's training model (time to target with the
                            run's own end point as the target; the run's last step if never)
    "cosine@ema/steps_to_final*0.95"   the same with the target at 0.95 of that accuracy

Accuracies are reported in percent, or as test error in percent with `report: error`.
Every difference is paired: the same seed's runs.

A row may be another table's runs: `{label: LB, from_table: swap}` takes the row of that label
from configs/reproduce/swap.yaml, runs and all (an ablation table compares against the main
table's baseline without training it twice, so each table keeps its own time budget).
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import yaml

SPECS = Path(__file__).resolve().parents[1] / "configs" / "reproduce"


class SpecError(ValueError):
    """A table spec that cannot be used as written (the message names the spec and the row)."""


def run_dir_name(label: str, seed: int) -> str:
    """The directory of a row's run: the label with each stretch of characters other than letters,
    digits, '.', '=' and '-' made one '_', so no path holds a space, '/' or a parenthesis."""
    return f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', label).strip('_')}-s{seed}"


def load_spec(name: str, specs: Path = SPECS) -> dict:
    """configs/reproduce/<name>.yaml with every `from_table` row replaced by the row it names
    (its config, overrides, entry, processes), marked with the table whose runs it is."""
    spec = yaml.safe_load((specs / f"{name}.yaml").read_text())
    rows = []
    for row in spec["rows"]:
        owner = row.get("from_table")
        if owner is None:
            rows.append(row)
            continue
        if not (specs / f"{owner}.yaml").exists():
            raise SpecError(f"{name}.yaml: row {row['label']!r} is from table {owner!r}, which has no spec")
        other = yaml.safe_load((specs / f"{owner}.yaml").read_text())
        theirs = next((r for r in other["rows"] if r["label"] == row["label"]), None)
        if theirs is None or "from_table" in theirs:
            raise SpecError(f"{name}.yaml: table {owner!r} has no row {row['label']!r} of its own to take "
                            f"(its rows: {', '.join(r['label'] for r in other['rows'])})")
        seeds, have = row.get("seeds", spec["seeds"]), theirs.get("seeds", other["seeds"])
        if set(seeds) - set(have):
            raise SpecError(f"{name}.yaml: row {row['label']!r} asks for seeds {seeds}; table {owner!r} "
                            f"runs it with {have}")
        keep = {k: v for k, v in theirs.items() if k != "seeds"} | {k: v for k, v in row.items() if k == "seeds"}
        keep.update(entry=theirs.get("entry", other["entry"]), from_table=owner, weights_seed=have[0],
                    processes=theirs.get("processes", other.get("processes", 1)))  # weights: the owner's figures
        rows.append(keep)
    return dict(spec, rows=rows)


def mean_std(values: list[float | None], fmt: str = "{:.2f}") -> str:
    """'m ± s' (sample std) over seeds, missing values (None) left out; one value as it is; '–' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def row_seeds(spec: dict, label: str) -> list[int]:
    row = next((r for r in spec["rows"] if r["label"] == label), None)
    if row is None:
        raise KeyError(f"{label!r} is not a row of table {spec['title']!r}")
    return row.get("seeds", spec["seeds"])


def metric_value(summary: dict, metric: str | None) -> float:
    """One number of one run: see the module docstring for the forms of `metric`."""
    if metric is None:
        return summary["final"]["output/acc"]
    key, _, epoch = metric.partition("@e")
    if "/steps_to_final" in key:
        ref, _, fraction = key.partition("*")
        name, target = ref.rpartition("/")[0], summary["final"]["model/acc"] * float(fraction or 1)
        hits = [h["step"] for h in summary["history"] if h["results"].get(name, {}).get("acc", -1) >= target]
        return float(min(hits, default=summary["steps"]))
    if key == "steps":  # optimizer steps of the run (per process: SWAP's critical path)
        return float(summary["steps"])
    if not epoch:
        return summary["final"][key]
    name, _, field = key.rpartition("/")
    hits = [h for h in summary["history"] if h["epoch"] == int(epoch) and name in h["results"]]
    if not hits:
        raise KeyError(f"no evaluation of {name!r} after epoch {epoch} in this run's history "
                       f"(evaluated epochs: {sorted({h['epoch'] for h in summary['history']})})")
    return hits[-1]["results"][name][field]


class Table:
    """The numbers of one table: rows x seeds, with percent conversion and paired differences."""

    def __init__(self, spec: dict, summaries: dict):
        self.spec, self.summaries = spec, summaries
        self.error = spec.get("report", "accuracy") == "error"

    def pct(self, metric: str | None, value: float) -> float:
        if metric is not None and not metric.partition("@e")[0].endswith("/acc"):
            return value  # seconds, counts: as they are
        return 100 * (1 - value) if self.error else 100 * value

    def values(self, ref: str, seeds: list[int] | None = None) -> dict[int, float]:
        """{seed: value} of a ref over the row's seeds (or the given ones)."""
        label, _, metric = ref.partition("@")
        metric = metric or None
        seeds = row_seeds(self.spec, label) if seeds is None else seeds
        return {s: self.pct(metric, metric_value(self.summaries[(label, s)], metric)) for s in seeds}

    def difference(self, a: str, b: str) -> dict[int, float]:
        """{seed: a - b} over the seeds both refs ran with."""
        seeds = [s for s in row_seeds(self.spec, a.partition("@")[0]) if s in row_seeds(self.spec, b.partition("@")[0])]
        va, vb = self.values(a, seeds), self.values(b, seeds)
        return {s: va[s] - vb[s] for s in seeds}


CROSS_CPU = ("† the two runs of this seed trained on different CPU models (family/model/stepping in the provenance): "
             "its difference also carries the cross-machine noise of README.md, What is reproducible.")


def cross_cpu(cpus: dict | None, a: str, b: str, seeds) -> list[int]:
    """The seeds whose runs of refs `a` and `b` trained on different CPU models, both recorded."""
    la, lb = a.partition("@")[0], b.partition("@")[0]
    known = [(cpus.get((la, s), "?"), cpus.get((lb, s), "?")) for s in seeds] if cpus else []
    return [s for s, (x, y) in zip(seeds, known) if "?" not in (x, y) and x != y]


def render(spec: dict, summaries: dict, provenance: list[str], plots: list[str],
           cpus: dict | None = None) -> tuple[str, dict]:
    """The table's markdown (without a Discussion) and its machine-readable numbers. `cpus`:
    {(label, seed): CPU model} of each run; a paired difference across two models is marked †."""
    t = Table(spec, summaries)
    what = "test error %" if t.error else "test acc %"
    extra = spec.get("extra_columns", {})
    rows = spec["rows"]
    lines = [f"# {spec['title']}", "", spec.get("description", "").strip(), "",
             f"{what[:-2].capitalize()} (%) and wall time (s): mean ± sample std over seeds {spec['seeds']}"
             + ("; rows with fewer seeds list them" if any("seeds" in r for r in rows) else "") + ".", "",
             f"| method | {what} | " + "".join(f"{title} | " for title in extra) + f"wall time s | per-seed {what} |",
             "|---|---|" + "---|" * len(extra) + "---|---|"]
    numbers: dict = {"title": spec["title"], "report": what, "rows": {}, "paired": {}}
    for row in rows:
        label = row["label"]
        result = t.values(label)
        cells = []
        for metric in extra.values():
            try:
                cells.append(mean_std(list(t.values(f"{label}@{metric}").values())))
            except KeyError:  # a column that does not apply to this row (e.g. workers of SB)
                cells.append("–")
        wall = [summaries[(label, s)]["final"]["wall_s"] for s in row_seeds(spec, label)]
        seeds_note = f" (seeds {row['seeds']})" if "seeds" in row else ""
        lines.append(f"| {label}{seeds_note} | {mean_std(list(result.values()))} | {''.join(c + ' | ' for c in cells)}"
                     f"{mean_std(wall)} | {', '.join(f'{v:.2f}' for v in result.values())} |")
        numbers["rows"][label] = {"per_seed": result, "wall_s": wall}
    if spec.get("paired"):
        marked = False
        lines += ["", "Paired differences (same seed; percentage points):", "",
                  "| difference | mean ± std | per seed |", "|---|---|---|"]
        for a, b, *title in spec["paired"]:  # an optional third entry names the difference
            diff = t.difference(a, b)
            name = title[0] if title else f"{a} − {b}"
            mixed = cross_cpu(cpus, a, b, diff)
            per_seed = ", ".join(f"{d:+.2f}" + "†" * (s in mixed) for s, d in diff.items())
            lines.append(f"| {name} | {mean_std(list(diff.values()))} | {per_seed} |")
            numbers["paired"][name] = {"a": a, "b": b, "per_seed": diff, "cross_cpu_seeds": mixed}
            marked = marked or bool(mixed)
        lines += ["", CROSS_CPU] if marked else []
    numbers["claims"] = []
    for claim in spec.get("claims", []):
        a, b = claim["difference"]
        diff = t.difference(a, b)
        numbers["claims"].append(dict(claim, per_seed=diff, a=t.values(a, list(diff)), b=t.values(b, list(diff)),
                                      cross_cpu_seeds=cross_cpu(cpus, a, b, diff)))
    return "\n".join(lines + plots + ["", "## Provenance", "", *provenance]) + "\n", numbers


def write(out: Path, markdown: str, numbers: dict) -> None:
    """Write the table and its numbers (<table>.json beside it); keep a hand-written Discussion."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.exists() else ""
    discussion = old[old.index("\n## Discussion"):] if "\n## Discussion" in old else ""
    out.write_text(markdown + discussion)
    out.with_suffix(".json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
