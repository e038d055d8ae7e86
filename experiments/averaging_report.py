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

from experiments.tables import mean_std  # noqa: E402
from swa_lib.time_to_target import time_to_target  # noqa: E402


def row_seeds(spec: dict, label: str) -> list[int]:
    row = next(r for r in spec["rows"] if r["label"] == label)
    return row.get("seeds", spec["seeds"])


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


def _series(spec) -> dict[str, tuple[str, str]]:
    """{curve name: (row label, evaluated model)} of the time-to-target section; the first is the baseline."""
    cfg = spec["averaging"]["time_to_target"]
    return {"baseline": (cfg["row"], "model"), **{k: (cfg["row"], v) for k, v in cfg["averages"].items()}}


def _time_to_target(spec, summaries, seeds, results_dir: Path) -> list:
    series = _series(spec)
    row = spec["averaging"]["time_to_target"]["row"]
    mine = row_seeds(spec, row)
    target = min(summaries[(row, s)]["final"]["model/acc"] for s in mine)
    lines = ["## 1. Time to target (cosine schedule)", "",
             f"Target: **{100 * target:.2f}%** test accuracy, the lowest final accuracy of the baseline (the "
             f"training model of `{row}`) over its seeds, so every baseline run reaches it within its budget "
             "(AlgoPerf sets targets the same way). The averages are evaluated on the side of the same run: they "
             "never feed back, so the baseline is exactly that run's training model. Steps and training seconds "
             "at the first evaluation at or above the target (evaluations every `eval.every_steps`; training "
             "seconds = wall time minus evaluation and checkpoint time). The run carries both averages' updates, "
             "so its training clock includes their cost for every curve (results/averaging_overhead_cpu.md "
             "measures that cost alone). Ratios are per seed, against the baseline of the same run.", "",
             "| curve | evaluated model | steps to target | ratio of steps | training s to target | "
             "ratio of time | final acc % |", "|---|---|---|---|---|---|---|"]
    reached = {k: {s: time_to_target(summaries[(r, s)]["history"], target).get(n) for s in mine}
               for k, (r, n) in series.items()}
    for k, (r, n) in series.items():
        hits = reached[k]
        steps = [h["step"] if h else None for h in hits.values()]
        secs = [h["train_s"] if h else None for h in hits.values()]
        base = reached["baseline"]
        r_steps = [h["step"] / base[s]["step"] if h and base[s] else None for s, h in hits.items()]
        r_secs = [h["train_s"] / base[s]["train_s"] if h and base[s] else None for s, h in hits.items()]
        n_hit = sum(h is not None for h in hits.values())
        final = [100 * summaries[(r, s)]["final"][f"{n}/acc"] for s in mine]
        lines.append(f"| {k} | {n} | {mean_std(steps, '{:.0f}')} ({n_hit}/{len(mine)} reached) | {mean_std(r_steps)} | "
                     f"{mean_std(secs, '{:.1f}')} | {mean_std(r_secs)} | {mean_std(final)} |")
    # Lower targets: where in training the averages help (their gain shrinks as the LR goes to zero).
    names = list(series)
    lines += ["", "Ratio of steps to lower targets (fractions of the target above; mean over seeds, paired "
              "with the baseline of the same run):", "",
              "| target acc % | " + " | ".join(f"{k} steps" for k in names) + " | "
              + " | ".join(f"{k} ratio" for k in names[1:]) + " |",
              "|---|" + "---|" * (2 * len(names) - 1)]
    for fraction in (0.8, 0.85, 0.9, 0.95, 1.0):
        hit = {k: {s: time_to_target(summaries[(r, s)]["history"], fraction * target).get(n) for s in mine}
               for k, (r, n) in series.items()}
        cells = [mean_std([h["step"] if h else None for h in hit[k].values()], "{:.0f}") for k in names]
        ratios = [mean_std([h["step"] / hit["baseline"][s]["step"] if h and hit["baseline"][s] else None
                            for s, h in hit[k].items()]) for k in names[1:]]
        lines.append(f"| {100 * fraction * target:.1f} | " + " | ".join(cells + ratios) + " |")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (k, (r, n)), color in zip(series.items(), ("black", "tab:blue", "tab:orange")):
        for i, s in enumerate(mine):
            steps, acc = curve(summaries[(r, s)], n)
            ax.plot(steps, [100 * a for a in acc], color=color, alpha=0.8, lw=1, label=k if i == 0 else None)
    ax.axhline(100 * target, color="gray", ls="--", lw=1, label="target")
    ax.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="Accuracy vs steps (one line per seed)")
    ax.set_ylim(bottom=max(0, 100 * target - 35))
    ax.legend()
    path = results_dir / f"{Path(spec['output']).stem}_accuracy_vs_steps.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    caption = "Test accuracy against optimizer steps: baseline, +LAWA, +EMA of one run (one line per seed)"
    return lines + [(caption, path)]


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
    series = _series(spec)
    (base, _), (lawa_row, lawa_name), (ema_row, ema_name) = series.values()
    schedules = {"cosine to 0": {"model": (base, "model"), "LAWA": (lawa_row, lawa_name), "EMA": (ema_row, ema_name)}}
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
    sections = [_time_to_target, *([_window_sweep] if "sweep_row" in spec["averaging"] else []), _lr_decay]
    for section in sections:
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
