"""Figures for the SWAP table (the `plots:` hook of configs/reproduce/swap.yaml).

accuracy_vs_time  test accuracy against wall time for SB, LB and SWAP (phase 1, each phase-2
                  worker, the phase-3 average), one seed, from the runs' evaluation history.
time_table        the time claim three ways: measured training time, critical-path optimizer
                  steps, and a modelled time on one core per process (see its docstring).
error_plane       test error on the plane through three phase-2 workers' weights (the paper's
                  figure): the workers' final weights come from the pinned phase-3 checkpoint
                  (rank r holds worker r when workers are single processes); every grid point
                  gets its BN statistics recomputed before it is evaluated.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils import parameters_to_vector, vector_to_parameters  # noqa: E402

from experiments.tables import mean_std, run_dir_name  # noqa: E402
from swa_lib.averaging import evaluate, update_bn_  # noqa: E402
from swa_lib.config import load_config  # noqa: E402
from swa_lib.methods.base import DataShard  # noqa: E402
from swa_lib.workload import Workload  # noqa: E402

COLORS = {"SB": "tab:blue", "LB": "tab:orange", "SWAP": "tab:green", "SWAP long phase 2": "tab:purple",
          "SWAP phase 1 to its cap (ablation)": "tab:olive"}


def _run_dir(run_base: Path, label: str, seed: int) -> Path:
    return run_base / run_dir_name(label, seed)


def accuracy_vs_time(spec, summaries, run_base, results_dir, seed=None):
    seed = spec["seeds"][0] if seed is None else seed
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in spec["rows"]:
        label = row["label"]
        history = summaries[(label, seed)]["history"]
        color = COLORS.get(label, None)
        if "swap" not in history[-1]["results"]:  # SB, LB: one synchronous model
            ax.plot([h["wall_s"] for h in history], [100 * h["results"]["model"]["acc"] for h in history],
                    "o-", color=color, label=label, ms=3)
            continue
        # The loop evaluates at every phase switch: the first grouped entry is the phase-1 model.
        grouped = [h for h in history if "groups" in h]
        phase1 = [h for h in history if "groups" not in h] + grouped[:1]
        ax.plot([h["wall_s"] for h in phase1], [100 * h["results"]["model"]["acc"] for h in phase1], "o-",
                color=color, label=f"{label}: phase 1 (large batch)", ms=3)
        for k in sorted(grouped[0]["groups"], key=int) if grouped else []:
            ax.plot([h["wall_s"] for h in grouped], [100 * h["groups"][k]["model"]["acc"] for h in grouped], "-",
                    color=color, alpha=0.45, lw=1, label=f"{label}: phase 2 workers" if k == "0" else None)
        last = history[-1]
        ax.plot([last["wall_s"]], [100 * last["results"]["swap"]["acc"]], "*", color=color, mec="black", ms=14,
                label=f"{label}: phase 3 (average)")
        ax.axvline(phase1[-1]["wall_s"], color=color, ls=":", lw=1)
    ax.set_xlabel("wall time (s, measured on this machine; evaluation included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"SB, LB and SWAP, seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(results_dir) / "swap_accuracy_vs_time.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [("Test accuracy against wall time: SB, LB, and SWAP's phases (one seed)", path)]


def _test_error(model, loader) -> float:
    """Test error in percent (swa_lib.averaging.evaluate, the loop's own evaluation, on the CPU)."""
    return 100 * (1 - evaluate(model, loader, torch.device("cpu"))["acc"])


def _worker_states(checkpoint: Path, count: int) -> list[dict]:
    """The first `count` phase-2 workers' weights from a SWAP checkpoint generation: rank r's model
    with one worker per process; with several, rank r's in-process workers (its strategy state in a
    run's checkpoint, one file each, rank{r}-worker{j}.pt, in a record)."""
    states: list[dict] = []
    for rank in itertools.count():
        files = [checkpoint / f"rank{rank}.pt"] if (checkpoint / f"rank{rank}.pt").exists() else \
            sorted(checkpoint.glob(f"rank{rank}-worker*.pt"), key=lambda f: int(f.stem.rpartition("worker")[2]))
        if len(states) >= count or not files:
            break
        for f in files:
            ckpt = torch.load(f, map_location="cpu", weights_only=False)
            workers = (ckpt.get("strategy") or {}).get("workers")
            states.extend(workers["models"] if workers is not None else [ckpt["model"]])
    if len(states) < count:
        raise ValueError(f"{checkpoint} holds {len(states)} phase-2 workers; the error plane needs {count}")
    return states[:count]


def error_plane(spec, summaries, run_base, results_dir, seed=None, grid=7, margin=0.35, test_images=1000,
                bn_batches=5):
    seed = spec["seeds"][0] if seed is None else seed
    run_dir = _run_dir(Path(run_base), "SWAP", seed)
    tag = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]
    cfg = load_config(run_dir / "config.yaml", [f"data.test_subset={test_images}", "run.channels_last=false"])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    workload = Workload(cfg, torch.device("cpu"))
    model = workload.build_model()
    states = _worker_states(run_dir / "checkpoints" / tag, 3)
    points = []
    for state in states:
        model.load_state_dict(state)
        points.append(parameters_to_vector(model.parameters()).clone())
    origin = points[0]
    u = points[1] - origin
    u_hat = u / u.norm()
    w = points[2] - origin
    v = w - (w @ u_hat) * u_hat
    v_hat = v / v.norm()
    coords = [((p - origin) @ u_hat).item() for p in points], [((p - origin) @ v_hat).item() for p in points]
    xs, ys = coords
    span_x, span_y = max(xs) - min(xs), max(ys) - min(ys)
    gx = torch.linspace(min(xs) - margin * span_x, max(xs) + margin * span_x, grid)
    gy = torch.linspace(min(ys) - margin * span_y, max(ys) + margin * span_y, grid)
    train = workload.train_loader(DataShard(0, 1, cfg.run.seed, cfg.optim.batch_size))
    train.set_epoch(0)
    test = workload.test_loader(0, 1)
    errors = torch.zeros(grid, grid)
    for i, a in enumerate(gx):
        for j, b in enumerate(gy):
            vector_to_parameters(origin + a * u_hat + b * v_hat, model.parameters())
            update_bn_(model, train, max_batches=bn_batches)
            errors[j, i] = _test_error(model, test)
    centroid = torch.stack(points).mean(0)
    vector_to_parameters(centroid, model.parameters())
    update_bn_(model, train, max_batches=bn_batches)
    centroid_error = _test_error(model, test)

    fig, ax = plt.subplots(figsize=(6, 5))
    contour = ax.contourf(gx.numpy(), gy.numpy(), errors.numpy(), levels=12, cmap="viridis_r")
    fig.colorbar(contour, ax=ax, label=f"test error % ({test_images} test images)")
    ax.plot(xs, ys, "o", color="white", mec="black", ms=8, label="phase-2 workers 0, 1, 2")
    ax.plot([sum(xs) / 3], [sum(ys) / 3], "*", color="tab:red", ms=16,
            label=f"their average ({centroid_error:.1f} % error)")
    for k, (x, y) in enumerate(zip(xs, ys)):
        ax.annotate(f"w{k}", (x, y), textcoords="offset points", xytext=(6, 6), color="white")
    ax.set_xlabel("direction w1 - w0")
    ax.set_ylabel("orthogonal direction towards w2")
    ax.set_title(f"SWAP phase-2 workers, seed {seed}; BN recomputed at every point")
    ax.legend(fontsize=8, loc="lower right")
    path = Path(results_dir) / "swap_error_plane.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [("Test error on the plane through three phase-2 workers, with their average", path)]


def _phase_steps(summary: dict) -> dict[str, int]:
    """Optimizer steps per phase, from the evaluation history. Every phase switch is evaluated, and
    that entry carries the phase *after* the switch, so a phase starts at the step of its first
    entry (the first phase at 0) and ends where the next one starts, or at the run's last step.
    Phase 3 (the average) takes no step and is left out; a phase 1 never evaluated before its
    switch (a sparse evaluation schedule) has no entry of its own and starts at 0."""
    first: dict[str, int] = {}
    for h in summary["history"]:
        first.setdefault(h["phase"], h["step"])
    if "phase2" in first and "phase1" not in first:
        first["phase1"] = 0
    phases = sorted(first, key=lambda p: first[p])
    ends = [first[p] for p in phases[1:]] + [summary["steps"]]
    return {p: end - (first[p] if i else 0) for i, (p, end) in enumerate(zip(phases, ends)) if p != "phase3"}


def models_per_process(summary: dict) -> int:
    """How many phase-2 workers each process held (in-process workers train one after another)."""
    workers = {k.split("/", 1)[0] for k in summary["final"] if k.startswith("group") and k[5:6].isdigit()}
    return max(1, len(workers) // summary["world_size"])


def modelled_train_s(summary: dict, processes: int, cores: int) -> float:
    """Training seconds with one core per process and one per phase-2 worker: the measured seconds
    scaled by cores / processes, with phase 2's seconds divided by the workers each process held."""
    m = models_per_process(summary)
    phase2 = summary["final"].get("time/phase/phase2", 0.0)
    return (summary["final"]["time/train"] - phase2 * (1 - 1 / m)) * min(1.0, cores / processes)


def time_table(spec, summaries, run_base, results_dir):
    """The SWAP time claim, three ways, each labelled for what it is.

    measured      training seconds of this run on this machine (all its processes sharing the
                  cores; evaluation and checkpoints excluded; phase 3's average and BN recompute
                  included).
    critical path sequential optimizer steps: phase-2 workers run in parallel, so a SWAP run's
                  critical path is its phase-1 steps plus one worker's phase-2 steps. On hardware
                  whose step time barely grows with the batch (GPUs far from saturation, the
                  paper's regime), time is proportional to this count.
    modelled      every process and every phase-2 worker on a core of its own: the measured
                  seconds scaled by cores / processes, and phase 2's seconds divided by the
                  workers each process held (in-process workers train one after another), so
                  each phase costs its critical-path steps times the seconds per step measured in
                  the same run (communication as measured here, included). On this CPU throughput
                  is flat in the batch, so this model gives large batches no advantage per image.
    """
    import os

    cores = len(os.sched_getaffinity(0))
    lines = ["## Time, three ways", "", time_table.__doc__.split("\n\n", 1)[1].replace("    ", ""), "",
             "| method | measured training s | critical-path steps | modelled s (one core per process and "
             "per worker) | steps per phase |", "|---|---|---|---|---|"]
    for row in spec["rows"]:
        label = row["label"]
        seeds = row.get("seeds", spec["seeds"])
        runs = [summaries[(label, s)] for s in seeds]
        procs = row.get("processes", spec.get("processes", 1))
        measured = [r["final"]["time/train"] for r in runs]
        steps = [r["steps"] for r in runs]
        modelled = [modelled_train_s(r, procs, cores) for r in runs]
        per_phase = _phase_steps(runs[0])
        lines.append(f"| {label} | {mean_std(measured, '{:.1f}')} | {mean_std(steps, '{:.0f}')} | "
                     f"{mean_std(modelled, '{:.1f}')} | "
                     + ", ".join(f"{p}: {n}" for p, n in per_phase.items()) + f" (seed {seeds[0]}) |")
    return ["\n".join(lines)]

