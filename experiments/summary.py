"""results/README.md: one row per headline claim, read from the tables' machine-readable numbers.

Each table spec lists the claims it tests (`claims:` in configs/reproduce/<name>.yaml):

    claims:
      - claim: SWA at 1.25 budgets is more accurate than SGD at one budget
        paper: "VGG16 CIFAR-10: ..."          # the paper's number, as stated in SPEC or the paper
        paper_status: verified | unverified   # read in the paper/official code here, or not
        difference: [SWA@swa/acc@e15, SGD]    # refs, as in experiments/tables.py
        expect: positive | negative | within 0.3 | at most 0.3
                                              # the sign the claim predicts for a - b; "no
                                              # difference": |a - b| <= 0.3 points; "a is no more
                                              # than 0.3 above b" (b not worse): a - b <= 0.3
        note: optional one-line context
        names: [SWA, SGD]                     # optional: how the summary names a and b (default:
                                              # their row labels, ambiguous when both are one row)

The verdict is mechanical, from the paired per-seed differences:
  holds                every seed's difference has the predicted sign (or is within the margin,
                       or at most the bound);
  partly               the mean has the predicted sign (or is within the margin, or at most the
                       bound), and so do most seeds (2 of 3), not all;
  does not hold here   otherwise: the mean has the other sign, or is zero (or is outside the
                       margin or above the bound), or only a minority of seeds agree with it (+0.01 from -0.03,
                       -0.01, +0.08 is noise around zero, not a partial effect).
`./run.sh reproduce <table>` writes results/<table>.json; this page reads only those files,
so it regenerates from a clean checkout without any run directory.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from experiments.tables import CROSS_CPU, mean_std

BUDGET_S = 2 * 3600.0  # a table's budget on the 2-core machine (issue 13)
RULE = ("holds: every seed's paired difference has the sign the claim predicts (or, for a claim of no "
        "difference, lies within its margin, or for a claim of no loss, is at most its bound); partly: the "
        "mean does and so do most seeds, but not every seed; does not hold here: the mean does not, or only a "
        "minority of seeds do")


def verdict(diffs: list[float], expect: str) -> str:
    if expect.startswith("within"):
        margin = float(expect.split()[1])
        ok = lambda d: abs(d) <= margin  # noqa: E731
    elif expect.startswith("at most"):
        bound = float(expect.split()[2])
        ok = lambda d: d <= bound  # noqa: E731
    elif expect in ("positive", "negative"):
        sign = 1 if expect == "positive" else -1
        ok = lambda d: sign * d > 0  # noqa: E731
    else:
        raise ValueError(f"claim expect {expect!r}: use positive, negative, 'within <points>' or "
                         f"'at most <points>'")
    agree = sum(ok(d) for d in diffs)
    if agree == len(diffs):
        return "holds"
    return "partly" if ok(statistics.mean(diffs)) and 2 * agree > len(diffs) else "does not hold here"


def claim_rows(root: Path, spec_names: list[str]) -> tuple[list[str], dict[str, float], list[str]]:
    """The claims' rows, each written table's wall time in seconds, and what is not yet produced."""
    lines, seconds, missing, crossed = [], {}, [], False
    for name in spec_names:
        spec = yaml.safe_load((root / "configs" / "reproduce" / f"{name}.yaml").read_text())
        numbers_path = (root / spec["output"]).with_suffix(".json")
        runs = sum(len(row.get("seeds", spec["seeds"])) for row in spec["rows"] if "from_table" not in row)  # its own
        records = root / "results" / "run_records" / name
        done = sum(1 for p in records.glob("*/summary.json")) if records.is_dir() else 0
        recorded = f"{done} of its {runs} runs recorded in {records.relative_to(root)}/; " if done else ""
        if not numbers_path.exists():
            missing.append(f"`{name}` (no {numbers_path.relative_to(root)}: {recorded}run `./run.sh reproduce {name}`)")
            continue
        numbers = json.loads(numbers_path.read_text())
        pending = [c["claim"] for c in spec.get("claims", []) if c["claim"] not in
                   {m["claim"] for m in numbers.get("claims", [])}]
        if pending:  # rows added to the spec after its table was written
            missing.append(f"`{name}`'s claim(s) {'; '.join(repr(c) for c in pending)} (not yet in "
                           f"{numbers_path.relative_to(root)}: {recorded}run `./run.sh reproduce {name}`)")
        seconds[name] = table_seconds(numbers)
        link = Path(spec["output"]).name
        names_of = {c["claim"]: c.get("names") for c in spec.get("claims", [])}
        for claim in numbers.get("claims", []):
            diffs = list(claim["per_seed"].values())
            mixed = {str(s) for s in claim.get("cross_cpu_seeds", [])}
            marks = ["†" if str(s) in mixed else "" for s in claim["per_seed"]]
            crossed = crossed or bool(mixed)
            name_a, name_b = names_of.get(claim["claim"]) or [r.partition("@")[0] for r in claim["difference"]]
            counts = all(float(v).is_integer() for v in [*claim["a"].values(), *claim["b"].values()])
            fmt = "{:.0f}" if counts else "{:.2f}"  # steps are counts; accuracies have two decimals
            ours = (f"{name_a}: {mean_std(list(claim['a'].values()), fmt)}; "
                    f"{name_b}: {mean_std(list(claim['b'].values()), fmt)}; "
                    f"difference {mean_std(diffs, fmt)} "
                    f"({', '.join(fmt.replace(':', ':+').format(d) + m for d, m in zip(diffs, marks))})")
            note = f" {claim['note']}" if claim.get("note") else ""
            lines.append(f"| {claim['claim']}{note} | {claim['paper']} ({claim['paper_status']}) | {ours} | "
                         f"**{verdict(diffs, claim['expect'])}** | [{link}]({link}) |")
    return lines + (["", CROSS_CPU] if crossed else []), seconds, missing


def table_seconds(numbers: dict) -> float:
    """A table's wall time: its runs' (table_wall_s), or, for a table written before that was
    recorded, the larger of its last invocation and its runs' wall times over the runs at a time."""
    if "table_wall_s" in numbers:
        return numbers["table_wall_s"]
    return max(numbers.get("elapsed_s", 0.0), numbers.get("run_wall_s", 0.0) / max(1, numbers.get("jobs_at_once") or 1))


def write(root: Path, spec_names: list[str], stale: dict[str, list[str]] | None = None) -> Path:
    """results/README.md. `stale`: per table, why this checkout would rerun its recorded runs."""
    rows, seconds, missing = claim_rows(root, spec_names)
    each = ", ".join(f"{name} {s / 3600:.2f} h" for name, s in seconds.items())
    over = [name for name, s in seconds.items() if s > BUDGET_S]
    lines = ["# Results: the papers' headline claims, as measured here", "",
             "Generated by `./run.sh reproduce summary` (and at the end of `./run.sh reproduce all`) from the "
             "tables' `.json` files; do not edit by hand. Every number is test accuracy or test error in percent, "
             "mean ± sample std over the seeds of the table, with the paired per-seed difference. Verdict rule: "
             f"{RULE}. A verdict is about this reduced setting on this machine, not about the paper's setting.", "",
             "| claim | paper | ours (mean ± std; paired difference, per seed) | verdict | table |",
             "|---|---|---|---|---|", *rows, "",
             f"Time to regenerate the tables above: {sum(seconds.values()) / 3600:.1f} h of wall time in all "
             f"({each}; the sum over each table's runs of their wall time divided by the table's runs that shared "
             "the cores with them, which counts runs that earlier invocations trained; each table says what else "
             "shared the cores). " + (f"Over the 2-hour budget of a table as measured, sharing included: "
                                      f"{', '.join(over)}." if over else "Every table is within 2 hours.")]
    if missing:
        lines += ["", "Not yet produced: " + "; ".join(missing) + "."]
    late = [f"`{name}` ({len(why)} recorded run(s) would rerun: {'; '.join(sorted(set(why)))})"
            for name, why in (stale or {}).items() if why]
    if late:
        lines += ["", "Out of date: these tables were written from runs that this checkout would not reuse (their "
                  "config or code changed since), so their rows above are of the earlier design until "
                  "`./run.sh reproduce <table>` reruns them: " + "; ".join(late) + "."]
    out = root / "results" / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out
