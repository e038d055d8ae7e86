"""Harness of benchmarks/faults.py: launch one faulted run, time it, check its checkpoint and weights, table rows.

A run's *time to exit* starts at the fault (the `INJECT` line fault_inject.py prints as it fires) when the
fault happens mid-run, else at the launch; `Run.ready_s` is the launch-to-`INJECT` time of a run that only
marks a point (fault `ready`: trainer built, no training), the startup cost a launch-time fault is compared with.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from mpi_util import MPIRUN, PYTHON  # noqa: E402
from swa_lib.workload import data_root  # noqa: E402

INJECT = ROOT / "tests" / "mpi_scripts" / "fault_inject.py"
LIMIT_S = 60  # the bar: a failing run must have exited this soon after the fault
TIMEOUT_S = 900  # a run still going after this is killed and its row fails (a hang)
FINALS = ("final_model.pt", "final_train_model.pt")


class Run:
    """One finished invocation: exit code, output, and its times.

    seconds: from the fault (the first `INJECT` line) to the exit, or from the launch when nothing printed
    one (a fault present before the launch); launch_s: launch to exit; ready_s: launch to `INJECT` (None
    without one); timed_out: killed after TIMEOUT_S (a hang)."""

    def __init__(self, cmd, env, cwd=ROOT, timeout_s: float = TIMEOUT_S):
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                start_new_session=True)
        self.inject_at = None
        out, err = [], []

        def pump(stream, sink, watch):
            for line in stream:
                sink.append(line)
                if watch and self.inject_at is None and line.startswith("INJECT"):
                    self.inject_at = time.monotonic()

        threads = [threading.Thread(target=pump, args=(proc.stdout, out, True)),
                   threading.Thread(target=pump, args=(proc.stderr, err, False))]
        for t in threads:
            t.start()
        self.timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            os.killpg(proc.pid, 9)
            proc.wait()
        for t in threads:
            t.join()
        end = time.monotonic()
        self.rc, self.stdout, self.stderr = proc.returncode, "".join(out), "".join(err)
        self.seconds = end - (self.inject_at or start)
        self.launch_s = end - start
        self.ready_s = None if self.inject_at is None else self.inject_at - start

    def cause(self) -> str:
        """The line a user reads first to learn what went wrong."""
        patterns = [r"^preempted: .*", r"^error(?: \(rank \d+\))?: .*", r"^rank \d+: .*(received|averaged).*",
                    r".*exited on signal \d+.*", r"^done: .*"]
        text = self.stderr + self.stdout
        for pattern in patterns:
            m = re.search(pattern, text, re.M)
            if m:  # "invalid config:" lists its problems on the lines after it, as "  - ..."
                more = re.match(r"(?:\n  - .*)*", text[m.end():]).group(0)
                return (m.group(0) + more.replace("\n  - ", " - ")).strip()
        return f"(no message; last output: {text.strip().splitlines()[-1:] or ''})"


def env_for(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}
    env.setdefault("SWA_DATA_ROOT", str(data_root_default()))
    return env


def data_root_default() -> Path:
    from swa_lib.config import Config
    return data_root(Config())


def launch(np: int, config: Path, run_dir: Path, fault="none", ranks="1", step=0, overrides=(), env=None,
           user: int | None = None, timeout_s: float = TIMEOUT_S) -> Run:
    cmd = [PYTHON, str(INJECT), fault, ranks, str(step), "--config", str(config), "--run-dir", str(run_dir),
           *overrides]
    if np > 1:
        cmd = [*MPIRUN, "-np", str(np), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "SWA_DATA_ROOT", *cmd]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return Run(cmd, env_for(env), timeout_s=timeout_s)


def checkpoint_state(run_dir: Path) -> tuple[bool, str]:
    """(intact, description): can every rank file of the generation latest.json names be loaded?"""
    directory = run_dir / "checkpoints"
    pointer = directory / "latest.json"
    if not pointer.exists():
        return True, "none written yet (nothing to lose)"
    info = json.loads(pointer.read_text())
    try:
        for rank in range(info["world_size"]):
            torch.load(directory / info["tag"] / f"rank{rank}.pt", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to load is what this column reports
        return False, f"`{info['tag']}` unreadable ({type(err).__name__})"
    return True, f"intact: `{info['tag']}`"


def finals(run_dir: Path) -> dict:
    return {name: torch.load(run_dir / name) for name in FINALS}


def same_weights(run_dir: Path, reference: dict) -> bool:
    mine = finals(run_dir)
    return all(torch.equal(mine[n][k], v) for n in FINALS for k, v in reference[n].items())


class Table:
    """Rows in the order the scenarios were listed, whatever order they finish in (they run in parallel)."""

    def __init__(self, on_change=None):
        self.rows = {}
        self.lock = threading.Lock()
        self.on_change = on_change or (lambda: None)  # rewrites the file after every row

    def add(self, order, fault, where, run: Run, ckpt: tuple[bool, str], resume: str, resumed_ok: bool | None,
            expect_rc=None, message_has=(), baseline: Run | None = None):
        """One row. `baseline`: a no-fault launch (fault `ready`) measured next to a fault present at launch."""
        message = run.cause()
        from_launch = run.inject_at is None
        failed = []
        if not all(word.lower() in message.lower() for word in message_has):
            failed.append(f"message lacks {message_has}")
        if expect_rc is not None and run.rc != expect_rc:
            failed.append(f"exit {run.rc}, expected {expect_rc}")
        if run.timed_out:
            failed.append("hung: killed by the harness's timeout")
        if not ckpt[0]:
            failed.append("checkpoint lost")
        if resumed_ok is False:
            failed.append("resume not bitwise")
        quick = run.rc != 0 and run.seconds <= LIMIT_S
        if not quick and resumed_ok is not True:
            why = ""
            if baseline is not None and baseline.ready_s is not None:
                extra = run.seconds - baseline.ready_s
                why = (f" (startup under this load: a no-fault launch took longer, {baseline.ready_s:.0f} s, to "
                       f"get as far)" if extra <= 0 else f" ({extra:.0f} s more than a no-fault launch's startup)")
            failed.append(f"exit {run.seconds:.0f} s after the {'launch' if from_launch else 'fault'} > {LIMIT_S} s"
                          + why)
        took = f"{run.seconds:.1f} s after the {'launch' if from_launch else 'fault'}"
        if baseline is not None:
            took += (f" (a no-fault launch took {baseline.ready_s:.1f} s to build its trainer)"
                     if baseline.ready_s is not None else f" (the no-fault launch failed: exit {baseline.rc})")
        verdict = "yes" if not failed else "**no**: " + "; ".join(failed)
        with self.lock:
            self.rows[order] = [fault, where, f"`{message[:400]}`", str(run.rc), took, ckpt[1], resume, verdict]
            self.on_change()
        print(f"[{'ok' if not failed else 'FAIL'}] {fault}: rc {run.rc}, {took}, {message[:300]}"
              + (f" -- {verdict}" if failed else ""), flush=True)

    def markdown(self) -> list[str]:
        head = ["fault", "where injected", "what the user sees", "exit", "time to exit", "last checkpoint",
                "resume reproduces the uninterrupted result", "meets the bar"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in sorted(self.rows.items()):
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |")
        return lines
