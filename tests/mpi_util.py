"""Run a Python script under a real `mpirun` from a test, with its output in any failure message."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
# Root may run mpirun only with --allow-run-as-root; more ranks than cores need --oversubscribe,
# and pinning oversubscribed ranks to cores makes them fight over one.
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def _show(proc_or_exc) -> str:
    out, err = proc_or_exc.stdout, proc_or_exc.stderr
    out = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
    err = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
    return f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}"


def run_mpi(np: int, script: Path, args=(), timeout_s: float = 120, env: dict | None = None,
            check: bool = True, mpirun_args=()) -> subprocess.CompletedProcess:
    """Run `script` on `np` ranks under mpirun and return the finished process (text output).

    Args:
        np: number of ranks.
        script: the Python file each rank runs.
        args: extra command-line arguments for the script.
        timeout_s: the whole job is killed (process group) after this many seconds and the
            test fails, so a hang cannot block the suite.
        env: variables added to this process's environment for the job.
        check: assert that mpirun exited with 0 (set False when a failure is the point).
        mpirun_args: extra mpirun options, e.g. ("--mca", "orte_abort_on_non_zero_status", "0").
    The repo root is put on PYTHONPATH, so scripts import swa_lib directly.
    """
    cmd = [*MPIRUN, *mpirun_args, "-np", str(np), "-x", "PYTHONPATH", PYTHON, str(script), *map(str, args)]
    return run_job(cmd, timeout_s, env, check)


def run_job(cmd: list[str], timeout_s: float = 120, env: dict | None = None, check: bool = True,
            cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run any launcher command line (mpirun, horovodrun, torchrun, srun) like `run_mpi` does:
    repo root on PYTHONPATH, the whole process group killed after `timeout_s`, output in failures."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return run_process(cmd, timeout_s, full_env, cwd, check)


def run_process(cmd: list, timeout_s: float, env: dict | None, cwd: Path | None, check: bool = True
                ) -> subprocess.CompletedProcess:
    """Run `cmd` with exactly `env` (None: this process's) in a new session, so that a timeout kills
    the launcher and every rank it started, not just it; failures show the output."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout_s} s (killed)\n"
                             + _show(subprocess.CompletedProcess(cmd, -9, out, err))) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} exited with {result.returncode}\n{_show(result)}"
    return result


def assert_ranks_said(result: subprocess.CompletedProcess, np: int, line_prefix: str) -> None:
    """Assert each rank 0..np-1 printed `<line_prefix> rank=<r>` (a script that did nothing fails)."""
    # Not anchored to line starts: ranks' lines can interleave without a newline between them.
    said = lambda r: re.search(rf"{re.escape(line_prefix)} rank={r}(?!\d)", result.stdout)  # noqa: E731
    missing = [r for r in range(np) if not said(r)]
    assert not missing, f"ranks {missing} never printed '{line_prefix} rank=R'\n{_show(result)}"
