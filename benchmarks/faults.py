"""Faults a cluster job meets, injected one at a time into tiny runs -> results/reliability.md.

    ./run.sh python benchmarks/faults.py                        # an hour or more on 2 shared CPU cores
    ./run.sh python benchmarks/faults.py --only disk_full --keep  # one scenario; keep its files to inspect

One row per fault: where it was injected, what the user sees (the line of the output that
names the cause), the exit code, the time from the fault to the exit, whether the last
good checkpoint is intact (every rank's file of the generation `latest.json` names loads),
and whether running the same command again ends bitwise equal to a run without the fault.
A row meets the bar when the message names the cause, the exit is non-zero within 60 s (or
the run resumed cleanly), and no good checkpoint was lost. A last section checkpoints a
4-rank run after every step for 200 steps while another process loads `latest` in a loop.

Scenarios: benchmarks/fault_scenarios.py; the load test: benchmarks/fault_load.py; launching,
timing and the table: benchmarks/fault_harness.py. Runs use the tiny configs of
tests/test_preemption.py (2 ranks, a small CNN, 128 CIFAR-10 images) and inject faults with
tests/mpi_scripts/fault_inject.py, at known optimizer steps.
Needs root (a tmpfs for the full disk, another user for the unreadable data root) and the
CIFAR-10 JPEG copy (../shared/data or SWA_DATA_ROOT).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks import fault_scenarios as sc  # noqa: E402
from benchmarks.fault_harness import Table, finals, launch  # noqa: E402
from benchmarks.fault_load import load_test  # noqa: E402
from swa_lib.run_log import git_commit, machine_description  # noqa: E402
from test_preemption import write_config  # noqa: E402


def jobs(work: Path, table: Table, refs: dict, args) -> dict:
    """name -> (function, its arguments after `order`), in the table's order."""
    out = {name: (sc.process_fault, (table, work, refs, case)) for name, case in sc.PROCESS_CASES.items()}
    out["disk_full"] = (sc.full_disk, (table, work, refs, args.keep))
    out["checkpoint_truncated"] = (sc.checkpoint_fault, (table, work, refs, "truncated"))
    out["checkpoint_corrupt"] = (sc.checkpoint_fault, (table, work, refs, "corrupt"))
    out["data"] = (sc.data_faults, (table, work))
    out["config"] = (sc.config_faults, (table, work, refs))
    return out


NAMES = [*sc.PROCESS_CASES, "disk_full", "checkpoint_truncated", "checkpoint_corrupt", "data", "config", "load"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "reliability.md"))
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                        help=f"only these scenarios (no file written unless --out is given): {', '.join(NAMES)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (and the full-disk tmpfs "
                        "mounted) for inspection")
    parser.add_argument("--load-steps", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2, help="scenarios run at once")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/faults.py needs root: it mounts a tmpfs (full disk) and runs as another user "
                 "(unreadable data root)")
    write_file = not args.only or "--out" in sys.argv
    names = args.only or NAMES
    started = dt.datetime.now(dt.timezone.utc)
    COMMIT.append(git_commit())  # the code the scenarios run, read once: the file this writes dirties the tree
    t0 = time.monotonic()
    load: list[str] = []
    loads = [os.getloadavg()]
    table = Table(on_change=lambda: write_file and write(args, started, t0, table, load, loads, final=False))
    work = Path(tempfile.mkdtemp(prefix="swa-faults-"))
    os.chmod(work, 0o755)
    refs: dict = {}
    write_config(work, "sgd")
    for method in ("swap", "hwa"):
        write_config(work, method)

    def reference(method):  # the uninterrupted results every resume is compared with
        ref_dir = work / f"reference-{method}"
        run = launch(2, work / f"{method}.yaml", ref_dir)
        assert run.rc == 0, run.stderr[-3000:]
        refs[method], refs[f"{method}_dir"] = finals(ref_dir), ref_dir

    def load_job():
        lines, stats = load_test(work, args.load_steps)
        load.extend(lines)
        print(f"[{'ok' if stats['ok'] else 'FAIL'}] load: {stats}", flush=True)
        if write_file:
            write(args, started, t0, table, load, loads, final=False)

    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            # The load test needs no reference run: it starts with them; everything else waits for them.
            pending = [pool.submit(guarded, "load", load_job)] if "load" in names else []
            needed = [m for m in ("swap", "hwa") if any(n != "load" and (m == "hwa") == ("hwa" in n) for n in names)]
            for f in [pool.submit(reference, m) for m in needed]:
                f.result()
            for order, (name, (fn, fn_args)) in enumerate(jobs(work, table, refs, args).items()):
                if name in names:
                    pending.append(pool.submit(guarded, name, fn, order, *fn_args))
                loads.append(os.getloadavg())
            for f in pending:
                f.result()
                loads.append(os.getloadavg())
    finally:
        if args.keep:
            print(f"kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    complete = set(names) == set(NAMES) and not HARNESS_ERRORS
    if write_file:
        write(args, started, t0, table, load, loads, final=complete)
    print("\n".join(table.markdown() + [""] + load))


def guarded(name, fn, *fn_args):
    """Run one scenario; a failure of the harness itself is reported and the other scenarios go on."""
    try:
        fn(*fn_args)
    except Exception:  # noqa: BLE001 - the table says which scenario has no row, the traceback why
        print(f"[HARNESS ERROR] {name}:\n{traceback.format_exc()}", flush=True)
        HARNESS_ERRORS.append(name)


HARNESS_ERRORS: list[str] = []
COMMIT: list[str] = []


def write(args, started, t0, table: Table, load: list[str], loads: list, final: bool) -> None:
    """The whole document; until the last row is in, it says it is partial (a killed run leaves what it had)."""
    loads = [*loads, os.getloadavg()]
    minutes = (time.monotonic() - t0) / 60
    command = f"nice -n {os.nice(0)} .venv/bin/python {' '.join(sys.argv)}"  # ./run.sh python, minus its setup
    lines = [
        "# Reliability: faults injected into runs, one at a time",
        *([] if final else ["", f"**Partial: {len(table.rows)} rows{' and the load test' if load else ''} so far, "
                                f"{minutes:.0f} min after the start; the run that writes this file had not finished "
                                f"(or ran only some scenarios).**"]),
        "",
        f"- Command: `{command}` ({args.parallel} scenarios at once; {minutes:.0f} min)",
        f"- Machine: {machine_description()}; 1-min load average between {min(x[0] for x in loads):.1f} and "
        f"{max(x[0] for x in loads):.1f} during the run, {loads[-1][0]:.1f} at the end; "
        + (f"{loads[0][0]:.1f} at the start: other jobs shared the cores, so times are under their load"
           if loads[0][0] >= 1.0 else f"{loads[0][0]:.1f} at the start: no other job held the cores; the load "
           "during the run is mostly the scenarios' own ranks"),
        f"- Commit: {COMMIT[0]} (at the start of the run)",
        f"- Date: {started.isoformat(timespec='seconds')}",
        "",
        "Tiny runs (2 ranks under mpirun, Horovod, CPU; a small CNN on 128 CIFAR-10 images) of SWAP "
        "(phase 1: 2 epochs x 4 steps; phase 2: 2 workers x 16 steps) and HWA (2 groups, a cycle every 4 steps, "
        "window 2), faults injected by `tests/mpi_scripts/fault_inject.py` at a chosen step. *Time to exit* runs "
        "from the fault (the moment it fires, printed by the injecting rank) to the end of mpirun; for a fault "
        "present before the launch (damaged checkpoint or data, a config or launch that does not fit) it runs from "
        "the launch, and next to it is the time a launch of the same command without the fault took to get as far "
        "(imports, MPI start, config checks, data from the warm cache, model built: fault `ready`), measured just "
        "before, on the same loaded machine: most of such a time is startup, not waiting on a hang. "
        "*Last checkpoint*: every rank's file of the generation `latest.json` names loads, after the fault. "
        "*Resume*: the same command again, without the fault, ends with final weights (the method's output and "
        "the training model) bitwise equal to the run that never met a fault. Exit 75 is the documented "
        "\"preempted, run me again\" code, 2 a config or launch that does not fit (nothing touched), 1 a failure. "
        "*Meets the bar*: the message names the cause, the exit code is the expected one, the last good "
        "checkpoint is intact, and the exit came within 60 s of the fault or the rerun was bitwise; a row that "
        "misses says which part.",
        "",
        *table.markdown(),
        *(["", f"No row (the harness itself failed; see its console): {', '.join(HARNESS_ERRORS)}"]
          if HARNESS_ERRORS else []),
        "",
        *(load or ["## Load: a checkpoint after every step, read concurrently", "", "Not run yet."]),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
