"""Steps and time to a target accuracy, read from a run's evaluation history.

The loop appends one record per evaluation to `Trainer.history` (also in summary.json):
{"step", "wall_s", "timers": seconds per phase so far, "results": {model name: {"acc", ...}}}.

Which clock. A run "+LAWA" evaluates two models at every evaluation and the baseline one,
and a denser evaluation grid would slow any run down; neither is part of training. So the
time to target is the TRAINING time at the first evaluation that reaches the target:
wall time minus every second spent evaluating (which includes BN recomputes of averages)
and checkpointing. It does include the averaging updates themselves, the real cost of
the method. Both are resolved only to the evaluation grid: the true crossing lies
between the previous evaluation and the reported one.
"""
from __future__ import annotations

NOT_TRAINING = ("eval", "checkpoint")  # timer phases excluded from the training clock


def training_seconds(record: dict) -> float:
    """Wall seconds up to this evaluation, minus evaluation and checkpoint time."""
    timers = record.get("timers", {})
    return record["wall_s"] - sum(timers.get(name, 0.0) for name in NOT_TRAINING)


def time_to_target(history: list[dict], target_acc: float) -> dict[str, dict | None]:
    """For every model evaluated in `history`: the first evaluation with acc >= target_acc,
    as {"step", "train_s", "wall_s"}, or None if it never got there."""
    names = sorted({name for record in history for name in record["results"]})
    out: dict[str, dict | None] = {name: None for name in names}
    for record in sorted(history, key=lambda r: r["step"]):
        for name, metrics in record["results"].items():
            if out[name] is None and metrics["acc"] >= target_acc:
                out[name] = {"step": record["step"], "train_s": training_seconds(record), "wall_s": record["wall_s"]}
    return out
