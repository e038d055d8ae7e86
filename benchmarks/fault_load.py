"""The load section of benchmarks/faults.py: checkpoint after every step of a 4-rank run while another process
loads `latest` in a loop; count unreadable loads and watch the checkpoint directory's size."""
from __future__ import annotations

import contextlib
import json
import threading
import time

import torch

from benchmarks.fault_harness import launch
from test_preemption import write_config


def _usage(directory) -> tuple[int, int]:
    """(generation directories, bytes of all files) under the checkpoint directory, as it is now."""
    gens, size = 0, 0
    for entry in list(directory.iterdir()):
        try:  # the writer may prune anything while we look
            if entry.is_dir():
                gens += 1
                size += sum(f.stat().st_size for f in list(entry.iterdir()))
            else:
                size += entry.stat().st_size
        except FileNotFoundError:
            pass
    return gens, size


def load_test(work, steps: int = 200, keep: int = 2) -> tuple[list[str], dict]:
    """4 ranks checkpoint after every step (1 step an epoch) while this process loads `latest` in a loop.

    Returns the report's lines and the numbers (stats; `ok` says whether the bar was met)."""
    config = write_config(work, "sgd", {"data": {"train_subset": 32}, "optim": {"batch_size": 8},
                                        "schedule": {"epochs": steps}, "eval": {"every_epochs": steps},
                                        "model": {"name": "tiny_cnn_no_bn"},
                                        "run": {"keep_checkpoints": keep, "log_every_steps": 50}}, name="load")
    run_dir = work / "load"
    directory = run_dir / "checkpoints"
    stats = {"pointer_reads": 0, "loads": 0, "unreadable": 0, "pruned_before_open": 0, "max_generations": 0,
             "max_bytes": 0, "generation_bytes": 0, "errors": []}
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                info = json.loads((directory / "latest.json").read_text())
            except FileNotFoundError:
                time.sleep(0.01)
                continue
            except ValueError as err:  # a torn pointer would land here: it must never happen
                stats["unreadable"] += 1
                stats["errors"].append(f"latest.json: {err}")
                continue
            stats["pointer_reads"] += 1
            gens, size = _usage(directory)
            stats["max_generations"] = max(stats["max_generations"], gens)
            stats["max_bytes"] = max(stats["max_bytes"], size)
            for rank in range(info["world_size"]):
                path = directory / info["tag"] / f"rank{rank}.pt"
                try:
                    with open(path, "rb") as fh:
                        state = torch.load(fh, weights_only=False)
                except FileNotFoundError:  # pruned after the pointer moved twice: re-read the pointer
                    stats["pruned_before_open"] += 1
                    break
                except Exception as err:  # noqa: BLE001 - any other failure is an unreadable checkpoint
                    stats["unreadable"] += 1
                    stats["errors"].append(f"{path}: {type(err).__name__}: {err}")
                    break
                if f"e{state['epoch']:04d}" != info["tag"][:5]:
                    stats["unreadable"] += 1
                    stats["errors"].append(f"{path} holds epoch {state['epoch']}, pointer says {info['tag']}")
                    break
                stats["loads"] += 1
                with contextlib.suppress(FileNotFoundError):
                    stats["generation_bytes"] = max(stats["generation_bytes"], path.stat().st_size * info["world_size"])

    thread = threading.Thread(target=reader)
    thread.start()
    start = time.monotonic()
    run = launch(4, config, run_dir, timeout_s=3600)  # 200 steps of 4 ranks on 2 shared cores
    done.set()
    thread.join()
    wall = time.monotonic() - start
    final = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.exists() else []
    bound_gens = keep + 1  # kept generations + the one being written before the pointer moves and pruning runs
    bound_bytes = bound_gens * stats["generation_bytes"] + 4096  # + latest.json and at most one temporary file
    stats.update(rc=run.rc, wall_s=wall, final=final, bound_generations=bound_gens, bound_bytes=bound_bytes)
    stats["ok"] = (run.rc == 0 and stats["unreadable"] == 0 and stats["loads"] > 0
                   and stats["max_generations"] <= bound_gens and stats["max_bytes"] <= bound_bytes
                   and len(final) <= keep)
    lines = [
        "## Load: a checkpoint after every step, read concurrently",
        "",
        f"4 ranks under mpirun, {steps} steps (one step an epoch, `run.checkpoint_every_epochs=1`, "
        f"`run.keep_checkpoints={keep}`), while one reader process reads `latest.json` and loads every rank's file "
        "of the generation it names, in a loop, and measures the checkpoint directory each time.",
        "",
        f"- Run: exit {run.rc}, wall {wall:.0f} s; {len(final)} generations left at the end: {', '.join(final)}"
        + ("" if run.rc == 0 else f"; `{run.cause()[:300]}`"),
        f"- Pointer reads: {stats['pointer_reads']}; rank-file loads attempted: "
        f"{stats['loads'] + stats['unreadable'] + stats['pruned_before_open']}, loaded: {stats['loads']}; "
        f"**unreadable: {stats['unreadable']}**" + (f" ({'; '.join(stats['errors'][:3])})" if stats["errors"] else ""),
        f"- Files pruned between reading the pointer and opening the file (the writer moved on {keep} generations "
        f"meanwhile; the reader re-reads the pointer; not a torn file): {stats['pruned_before_open']}",
        f"- Most generation directories seen at once: {stats['max_generations']} (retention bound: keep {keep} + "
        f"the one being written = {bound_gens}); most bytes: {stats['max_bytes']:,} (a generation is "
        f"{stats['generation_bytes']:,} bytes; bound {bound_bytes:,})",
        f"- Verdict: {'meets the bar' if stats['ok'] else '**does not meet the bar**'} (zero unreadable loads, "
        "the directory within the retention bound)",
    ]
    return lines, stats
