"""The LAWA/EMA sections of results/averaging_reduced.md, read from the runs' evaluation histories.

Called by experiments/reproduce.py through the spec's `plots:` key; the spec's `averaging:`
block names the rows. Three sections: time to target (steps and training seconds, as ratios
to the baseline of the same seed), the window sweep, and averaging vs LR decay.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from swa_lib.time_to_target import time_to_target  # noqa: E402


def row_seeds(spec: dict, label: str) -> list[int]:
    row = next(r for r in spec["rows"] if r["label"] == label)
    return row.get("seeds", spec["seeds"])


def mean_std(values, fmt="{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def curve(summary: dict, name: str) -> tuple[list[int], list[float]]:
    """(steps, accuracies) of one evaluated model, one point per step (the last evaluation wins)."""
    points = {r["step"]: r["results"][name]["acc"] for r in summary["history"] if name in r["results"]}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def window_steps(label: str) -> float:
    """Averaging window in steps: nu x L for LAWA, the EMA horizon nu / (1 - beta)."""
    lawa = re.fullmatch(r"lawa_nu(\d+)_L(\d+)", label)
    if lawa:
        return int(lawa[1]) * int(lawa[2])
    ema = re.fullmatch(r"ema_nu(\d+)_b([0-9.]+)(_wu)?", label)
    return int(ema[1]) / (1 - float(ema[2]))


def _training_s(summary: dict) -> float:
    """A whole run's training seconds: wall time minus evaluation and checkpoint time."""
    f = summary["final"]
    return f["wall_s"] - f.get("time/eval", 0.0) - f.get("time/checkpoint", 0.0)


def _time_to_target(spec, summaries, seeds, results_dir: Path) -> list:
    cfg = spec["averaging"]
    base = cfg["baseline"]
    target = min(summaries[(base, s)]["final"]["output/acc"] for s in row_seeds(spec, base))
    lines = ["## 1. Time to target (cosine schedule)", "",
             f"Target: **{100 * target:.2f}%** test accuracy, the lowest final accuracy of `{base}` over its "
             "seeds. Steps and training seconds at the first evaluation at or above it (evaluations every "
             "`eval.every_steps`; training seconds = wall time minus evaluation and checkpoint time, so "
             "evaluating extra models costs a run nothing, while its averaging updates count). Ratios are "
             "per seed against the baseline of the same seed.", "",
             "| run | seeds | evaluated model | steps to target | ratio of steps | training s to target | "
             "ratio of time | training ms per step (per seed) | final acc % |",
             "|---|---|---|---|---|---|---|---|---|"]
    reached = {}
    for row in cfg["time_to_target"]:
        out = summaries[(row, row_seeds(spec, row)[0])]["output_name"]
        reached[row] = {s: time_to_target(summaries[(row, s)]["history"], target)[out] for s in row_seeds(spec, row)}
    for row in cfg["time_to_target"]:
        hits, mine = reached[row], row_seeds(spec, row)
        steps = [h["step"] if h else None for h in hits.values()]
        secs = [h["train_s"] if h else None for h in hits.values()]
        paired = [(h, reached[base][s]) for s, h in hits.items()]
        r_steps = [h["step"] / b["step"] if h and b else None for h, b in paired]
        r_secs = [h["train_s"] / b["train_s"] if h and b else None for h, b in paired]
        n = sum(h is not None for h in hits.values())
        final = [100 * summaries[(row, s)]["final"]["output/acc"] for s in mine]
        per_step = [1e3 * _training_s(summaries[(row, s)]) / summaries[(row, s)]["steps"] for s in mine]
        lines.append(f"| {row} | {mine} | {summaries[(row, mine[0])]['output_name']} | {mean_std(steps, '{:.0f}')} "
                     f"({n}/{len(mine)} reached) | {mean_std(r_steps)} | {mean_std(secs, '{:.1f}')} | "
                     f"{mean_std(r_secs)} | {', '.join(f'{p:.0f}' for p in per_step)} | {mean_std(final)} |")
    # Lower targets: where in training the averages help (their gain shrinks as the LR goes to zero).
    lines += ["", "Ratio of steps to lower targets (fractions of the target above; mean over each row's seeds, "
              "paired with the baseline's seed):", "",
              "| target acc % | " + " | ".join(f"{row} steps" for row in cfg["time_to_target"]) + " | "
              + " | ".join(f"{row} ratio" for row in cfg["time_to_target"][1:]) + " |",
              "|---|" + "---|" * (2 * len(cfg["time_to_target"]) - 1)]
    for fraction in (0.8, 0.85, 0.9, 0.95, 1.0):
        hit = {row: {s: time_to_target(summaries[(row, s)]["history"], fraction * target)[
            summaries[(row, s)]["output_name"]] for s in row_seeds(spec, row)} for row in cfg["time_to_target"]}
        cells = [mean_std([h["step"] if h else None for h in hit[row].values()], "{:.0f}")
                 for row in cfg["time_to_target"]]
        ratios = [mean_std([h["step"] / hit[base][s]["step"] if h and hit[base][s] else None
                            for s, h in hit[row].items()]) for row in cfg["time_to_target"][1:]]
        lines.append(f"| {100 * fraction * target:.1f} | " + " | ".join(cells + ratios) + " |")
    # The averaging runs train exactly the baseline's model: their "model" curves must coincide.
    diffs = [abs(a - b) for row in cfg["time_to_target"][1:] for s in row_seeds(spec, row)
             for a, b in zip(curve(summaries[(row, s)], "model")[1], curve(summaries[(base, s)], "model")[1])]
    verdict = ("matches the baseline run of its seed at every evaluation exactly (averages never feed back)"
               if max(diffs) == 0 else f"differs from the baseline run of its seed by up to {max(diffs):.4f} accuracy")
    lines += ["", f"Check: the training model of every averaging run {verdict}."]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row, color in zip(cfg["time_to_target"], ("black", "tab:blue", "tab:orange")):
        for i, s in enumerate(row_seeds(spec, row)):
            steps, acc = curve(summaries[(row, s)], summaries[(row, s)]["output_name"])
            ax.plot(steps, [100 * a for a in acc], color=color, alpha=0.8, lw=1, label=row if i == 0 else None)
    ax.axhline(100 * target, color="gray", ls="--", lw=1, label="target")
    ax.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="Accuracy vs steps (one line per seed)")
    ax.set_ylim(bottom=max(0, 100 * target - 35))
    ax.legend()
    path = results_dir / f"{Path(spec['output']).stem}_accuracy_vs_steps.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines + [("Test accuracy against optimizer steps: cosine baseline, +LAWA, +EMA (one line per seed)", path)]


def _window_sweep(spec, summaries, seeds, results_dir: Path) -> list:
    row = spec["averaging"]["sweep_row"]
    seeds = row_seeds(spec, row)
    runs = [summaries[(row, s)] for s in seeds]
    total = runs[0]["steps"]
    names = sorted((n for n in runs[0]["history"][-1]["results"] if n != "model"), key=window_steps)
    half = [max(st for st in curve(runs[0], "model")[0] if st <= total // 2)]
    lines = ["## 2. Window sweep", "",
             f"One cosine run per seed (seeds {seeds}), T = {total} steps, all averages evaluated on the side. "
             "Window = nu x L "
             f"(LAWA) or nu / (1 - beta) (EMA). Accuracy at the end and at step {half[0]} (mid-training, "
             "where the LR is still high); gains are paired against the same run's training model.", "",
             "| average | window steps | window / T | final acc % | final gain (pts) | mid acc % | mid gain (pts) |",
             "|---|---|---|---|---|---|---|"]
    points = {}
    for name in ["model", *names]:
        final = [100 * r["final"][f"{name}/acc"] for r in runs]
        mid = [100 * dict(zip(*curve(r, name))).get(half[0], float("nan")) for r in runs]
        base_f = [100 * r["final"]["model/acc"] for r in runs]
        base_m = [100 * dict(zip(*curve(r, "model")))[half[0]] for r in runs]
        gain_f = [a - b for a, b in zip(final, base_f)]
        gain_m = [a - b for a, b in zip(mid, base_m)]
        w = 1 if name == "model" else window_steps(name)
        points[name] = (w, statistics.mean(gain_f), statistics.mean(gain_m))
        lines.append(f"| {name} | {w:g} | {100 * w / total:.1f}% | {mean_std(final)} | {mean_std(gain_f)} | "
                     f"{mean_std(mid)} | {mean_std(gain_m)} |")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, k, title in ((axes[0], 1, "end of training"), (axes[1], 2, f"step {half[0]} (mid-training)")):
        for kind, marker in (("lawa", "o"), ("ema", "s")):
            sel = sorted((points[n][0], points[n][k]) for n in names if n.startswith(kind))
            ax.plot([100 * w / total for w, _ in sel], [g for _, g in sel], marker=marker, label=kind.upper())
        ax.axhline(0, color="gray", lw=1)
        ax.set(xscale="log", xlabel="window / T (%)", ylabel="gain over the iterate (pts)", title=title)
        ax.legend()
    path = results_dir / f"{Path(spec['output']).stem}_window_sweep.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines + [(f"Window sweep: accuracy gain of the average over its own training model (seeds {seeds})", path)]


def _lr_decay(spec, summaries, seeds, results_dir: Path) -> list:
    cfg = spec["averaging"]
    base, lawa_row, ema_row = cfg["time_to_target"]
    schedules = {"cosine to 0": {"model": (base, "model"), "LAWA": (lawa_row, "lawa"), "EMA": (ema_row, "ema")}}
    for row in cfg["lr_decay_rows"]:
        names = [n for n in summaries[(row, seeds[0])]["final"] if n.endswith("/acc") and "/" in n]
        lawa = next(n[:-4] for n in names if n.startswith("lawa"))
        ema = next(n[:-4] for n in names if n.startswith("ema"))
        schedules[row.replace(" +averages", "")] = {"model": (row, "model"), "LAWA": (row, lawa), "EMA": (row, ema)}
    # Every schedule is compared on the seeds all its rows ran with (rows may cut seeds).
    common = {sch: [s for s in seeds if all(s in row_seeds(spec, r) for r, _ in series.values())]
              for sch, series in schedules.items()}
    acc = {(sch, k): {s: 100 * summaries[(r, s)]["final"][f"{n}/acc"] for s in common[sch]}
           for sch, series in schedules.items() for k, (r, n) in series.items()}
    ref = acc[("cosine to 0", "model")]
    lines = ["## 3. Can averaging replace LR decay?", "",
             "Final test accuracy (%) of the training model and of its averages under each schedule "
             "(same peak LR, same budget). Gain = average minus the same run's model (paired per seed); "
             "vs cosine = average minus the cosine-to-0 baseline without averaging.", "",
             "| schedule | seeds | model | LAWA | EMA | LAWA gain | EMA gain | LAWA vs cosine | EMA vs cosine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sch in schedules:
        m, la, em = acc[(sch, "model")], acc[(sch, "LAWA")], acc[(sch, "EMA")]
        d = lambda a, b: [a[s] - b[s] for s in a]  # noqa: E731  (same seeds, paired)
        v = lambda a: list(a.values())  # noqa: E731
        lines.append(f"| {sch} | {common[sch]} | {mean_std(v(m))} | {mean_std(v(la))} | {mean_std(v(em))} | "
                     f"{mean_std(d(la, m))} | {mean_std(d(em, m))} | {mean_std(d(la, ref))} | {mean_std(d(em, ref))} |")
    fig, axes = plt.subplots(1, len(schedules), figsize=(4.2 * len(schedules), 3.6), sharey=True)
    for ax, (sch, series) in zip(axes, schedules.items()):
        for (k, (r, n)), color in zip(series.items(), ("black", "tab:blue", "tab:orange")):
            steps, a = curve(summaries[(r, seeds[0])], n)
            ax.plot(steps, [100 * x for x in a], color=color, label=k)
        ax.set(title=f"{sch} (seed {seeds[0]})", xlabel="optimizer step")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    path = results_dir / f"{Path(spec['output']).stem}_lr_decay.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines + [("Averaging vs LR decay: training model, LAWA and EMA under each schedule", path)]


def report(spec: dict, summaries: dict, run_base: Path, results_dir: Path) -> list:
    seeds = spec["seeds"]
    results_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for section in (_time_to_target, _window_sweep, _lr_decay):
        for item in section(spec, summaries, seeds, results_dir):
            out.append(item)
    # Consecutive markdown lines form one block (a table must not be split by blank lines).
    merged, block = [], []
    for item in out:
        if isinstance(item, str):
            block.append(item)
        else:
            merged += ["\n".join(block)] if block else []
            merged.append(item)
            block = []
    return merged + (["\n".join(block)] if block else [])
