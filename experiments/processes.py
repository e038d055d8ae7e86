"""Starting, watching and stopping the runs of a table (experiments/reproduce.py): the command that
launches a run (under mpirun when it has several processes), how far it has got, and the stop that
lets every rank checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_command(entry: str, processes: int, config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, str(ROOT / entry), "--config", str(ROOT / config), "--run-dir", str(run_dir), *overrides]
    if processes > 1:
        flags = ["--oversubscribe", "--bind-to", "none", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
        if os.geteuid() == 0:
            flags.append("--allow-run-as-root")
        cmd = ["mpirun", *flags, "-np", str(processes), *cmd]
    return cmd


def stop_runs(running: dict, signum: int, grace_s: float = 300.0) -> None:
    """Ask each running run to stop at its next step and wait for it: the signal goes to the ranks
    (mpirun's children), which checkpoint that step and exit 75, not to mpirun itself, which answers
    SIGTERM or SIGINT by killing its ranks within a second, before they checkpoint (Open MPI 4.1).
    A run still alive after grace_s is killed; it resumes from its last epoch checkpoint instead."""
    for proc in running.values():
        ranks = set()
        for f in Path(f"/proc/{proc.pid}/task").glob("*/children"):
            ranks |= {int(pid) for pid in f.read_text().split()}
        for pid in ranks or {proc.pid}:  # a 1-process run has no mpirun: it is the rank
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in running.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def last_epoch(run_dir: Path) -> float:
    """The last epoch a run's metrics.jsonl has logged (0 before any), read from the file's tail."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return 0.0
    for line in reversed(lines):  # the first may be cut by the seek, the last half written
        try:
            return float(json.loads(line)["epoch"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0.0
