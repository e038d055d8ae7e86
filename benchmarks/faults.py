"""Faults a cluster job meets, injected one at a time into tiny runs -> results/reliability.md.

    ./run.sh python benchmarks/faults.py                 # about 30-60 min on 2 shared CPU cores
    ./run.sh python benchmarks/faults.py --only sigkill  # rows whose fault name contains a word

One row per fault: where it was injected, what the user sees (the line of the output that
names the cause), the exit code, the time from the fault to the exit, whether the last
good checkpoint is intact (every rank's file of the generation `latest.json` names loads),
and whether running the same command again ends bitwise equal to a run without the fault.
A row meets the bar when the message names the cause, the exit is non-zero within 60 s (or
the run resumed cleanly), and no good checkpoint was lost. A last section checkpoints a
4-rank run after every step for 200 steps while another process loads `latest` in a loop.

Runs use the tiny configs of tests/test_preemption.py (2 ranks, a small CNN, 128 CIFAR-10
images) and inject faults with tests/mpi_scripts/fault_inject.py, at known optimizer steps.
Needs root (a tmpfs for the full disk, another user for the unreadable data root) and the
CIFAR-10 JPEG copy (../shared/data or SWA_DATA_ROOT).
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mpi_util import MPIRUN, PYTHON  # noqa: E402
from test_preemption import write_config  # noqa: E402

from swa_lib.run_log import git_commit, machine_description  # noqa: E402
from swa_lib.workload import data_root  # noqa: E402

INJECT = ROOT / "tests" / "mpi_scripts" / "fault_inject.py"
LIMIT_S = 60  # the bar: a failing run must have exited this soon after the fault
TIMEOUT_S = 600  # a run still going after this is killed and its row fails (a hang)
FINALS = ("final_model.pt", "final_train_model.pt")


class Run:
    """One finished invocation: exit code, output, seconds from start and from the fault to the exit."""

    def __init__(self, cmd, env, cwd=ROOT):
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
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        for t in threads:
            t.join()
        end = time.monotonic()
        self.rc, self.stdout, self.stderr = proc.returncode, "".join(out), "".join(err)
        self.seconds = end - (self.inject_at or start)

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
           user: int | None = None) -> Run:
    cmd = [PYTHON, str(INJECT), fault, ranks, str(step), "--config", str(config), "--run-dir", str(run_dir),
           *overrides]
    if np > 1:
        cmd = [*MPIRUN, "-np", str(np), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "SWA_DATA_ROOT", *cmd]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return Run(cmd, env_for(env))


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
            expect_rc=None, message_has=()):
        message = run.cause()
        named = all(word.lower() in message.lower() for word in message_has)
        clean_resume = resumed_ok is True
        quick = run.rc != 0 and run.seconds <= LIMIT_S
        rc_ok = expect_rc is None or run.rc == expect_rc
        ok = named and rc_ok and ckpt[0] and (quick or clean_resume) and resumed_ok is not False
        with self.lock:
            self.rows[order] = [fault, where, f"`{message[:220]}`", str(run.rc), f"{run.seconds:.1f} s", ckpt[1],
                                resume, "yes" if ok else "**no**"]
            self.on_change()
        print(f"[{'ok' if ok else 'FAIL'}] {fault}: rc {run.rc}, {run.seconds:.1f} s, {message[:160]}", flush=True)

    def markdown(self) -> list[str]:
        head = ["fault", "where injected", "what the user sees", "exit", "time to exit", "last checkpoint",
                "resume reproduces the uninterrupted result", "meets the bar"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, row in sorted(self.rows.items()):
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |")
        return lines


# ---------------------------------------------------------------------------- scenarios

def resume_and_compare(np, config, run_dir, reference, overrides=()) -> tuple[str, bool]:
    again = launch(np, config, run_dir, overrides=overrides)
    if again.rc != 0:
        return f"no: rerun exited {again.rc}: `{again.cause()[:120]}`", False
    ok = same_weights(run_dir, reference)
    return ("yes, bitwise (same command again)" if ok else "**no**: final weights differ"), ok


PROCESS_CASES = [  # fault, ranks, step, method, where, expected exit, words the message must hold
        ("sigkill", "1", 3, "swap", "rank 1 after step 3: SWAP phase 1 (epoch 0, batch 3 of 4)", None, ["signal 9"]),
        ("sigkill", "1", 13, "swap", "rank 1 after step 13: SWAP phase 2 (epoch 2, batch 5 of 16)", None,
         ["signal 9"]),
        ("sigkill", "1", 11, "hwa", "rank 1 after step 11: HWA, mid-cycle, 2 averages in the window", None,
         ["signal 9"]),
        ("sigkill_checkpoint", "1", 5, "swap", "rank 1, half-way through writing its file of the phase-1 -> 2 "
         "checkpoint (step 8)", None, ["signal 9"]),
        ("sigterm", "1", 13, "swap", "rank 1 only, after step 13 (SWAP phase 2)", 75, ["preempted", "signal"]),
        ("sigterm", "all", 11, "hwa", "every rank, after step 11 (HWA window)", 75, ["preempted", "signal"]),
        ("sigint", "0", 3, "swap", "rank 0 only (Ctrl-C), after step 3 (SWAP phase 1)", 75, ["preempted"]),
        ("nan", "1", 5, "swap", "rank 1's first weight tensor set to NaN after step 5 (SWAP phase 1)", 1, ["nan"]),
]


def process_fault(order, table, work, refs, case):
    """Signals, kills and NaN in SWAP and HWA runs of 2 ranks."""
    fault, ranks, step, method, where, rc, words = case
    run_dir = work / f"{fault}-{ranks}-{method}-{step}"
    config = work / f"{method}.yaml"  # written once by main: runs in parallel read it
    run = launch(2, config, run_dir, fault, ranks, step)
    ckpt = checkpoint_state(run_dir)
    resume, ok = resume_and_compare(2, config, run_dir, refs[method])
    table.add(order, fault.upper().replace("_CHECKPOINT", " during a checkpoint write"), where, run, ckpt, resume,
              ok, expect_rc=rc, message_has=words)


def full_disk(order, table, work, refs):
    mount = work / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    try:
        config = work / "swap.yaml"
        run_dir = mount / "run"
        run = launch(2, config, run_dir, "fill_disk", "0", 5)
        ckpt = checkpoint_state(run_dir)
        (mount / "filler").unlink()  # the user frees space, then runs the same command again
        resume, ok = resume_and_compare(2, config, run_dir, refs["swap"])
        table.add(order, "disk full during a checkpoint write", "a 32 MB tmpfs holding the run directory, filled by "
                  "another file after step 5; the epoch-1 checkpoint (step 8) is the next write",
                  run, ckpt, resume + " after freeing space", ok, expect_rc=1, message_has=["no space"])
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def checkpoint_fault(order, table, work, refs, kind):
    """A truncated or corrupt file in the newest of two checkpoint generations (a run killed in phase 2)."""
    config = work / "swap.yaml"
    run_dir = work / f"checkpoint-{kind}"
    killed = launch(2, config, run_dir, "sigkill", "1", 13)
    assert killed.rc != 0 and "INJECT" in killed.stdout, killed.stderr[-2000:]
    tag = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]
    victim = run_dir / "checkpoints" / tag / ("rank0.pt" if kind == "truncated" else "rank1.pt")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if kind == "truncated" else os.urandom(len(data)))
    run = launch(2, config, run_dir)
    older = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir() and p.name != tag)
    pointer = run_dir / "checkpoints" / "latest.json"
    info = json.loads(pointer.read_text())
    info["tag"] = older[-1]  # what the message tells the user to do
    pointer.write_text(json.dumps(info))
    ckpt = checkpoint_state(run_dir)
    ckpt = (ckpt[0], f"older generation {ckpt[1]}")
    resume, ok = resume_and_compare(2, config, run_dir, refs["swap"])
    table.add(order, f"{kind} checkpoint file", f"{victim.relative_to(run_dir)} ({'half its bytes' if kind == 'truncated' else 'random bytes'}), "
              f"then the same command", run, ckpt, resume + " after pointing latest.json at the older generation "
              "as the message says", ok, expect_rc=1, message_has=["cannot be read", victim.name])


def data_faults(order, table, work):
    """A corrupt JPEG, a truncated archive, a missing and an unreadable data root (single process)."""
    real = data_root_default() / "cifar10"
    config = write_config(work, "sgd", {"run": {"checkpoint_every_epochs": 1}}, name="sgd-data")
    cases = []
    corrupt = work / "data-corrupt" / "cifar10"
    corrupt.mkdir(parents=True)
    shutil.copy(real / "cifar10_jpg_index.csv.gz", corrupt)
    with tarfile.open(real / "cifar10_jpg.tar.xz", "r|xz") as src, \
            tarfile.open(corrupt / "cifar10_jpg.tar.xz", "w:xz", preset=0) as dst:
        files = 0
        for member in src:
            blob = src.extractfile(member).read() if member.isfile() else None
            if member.isfile():
                files += 1
                if files == 50:
                    blob = b"\xff\xd8\xff\xe0" + os.urandom(len(blob) - 4)  # a JPEG header, garbage after
                    corrupt_name = member.name
                member.size = len(blob)
            dst.addfile(member, io.BytesIO(blob) if blob is not None else None)
            if files >= 200:
                break
    cases.append(("corrupt JPEG in the data", f"`{corrupt_name}` (a 200-image copy of the archive, member 50 "
                  f"overwritten)", corrupt.parent, ["cannot", Path(corrupt_name).name]))
    truncated = work / "data-truncated" / "cifar10"
    truncated.mkdir(parents=True)
    shutil.copy(real / "cifar10_jpg_index.csv.gz", truncated)
    blob = (real / "cifar10_jpg.tar.xz").read_bytes()
    (truncated / "cifar10_jpg.tar.xz").write_bytes(blob[: len(blob) // 8])
    cases.append(("truncated archive in the data", "cifar10_jpg.tar.xz cut to 1/8 of its bytes", truncated.parent,
                  ["truncated"]))
    cases.append(("data root missing", "SWA_DATA_ROOT names a directory that does not exist",
                  work / "no-such-dir", ["neither"]))
    unreadable = work / "data-unreadable"
    (unreadable / "cifar10").mkdir(parents=True)
    for name in ("cifar10_jpg.tar.xz", "cifar10_jpg_index.csv.gz"):
        shutil.copy(real / name, unreadable / "cifar10")
    cases.append(("data root unreadable", "data root mode 000, the run as another user (uid 65534)", unreadable,
                  ["permission"]))
    for i, (fault, where, root, words) in enumerate(cases):
        run_dir, cache = work / f"run-{root.name}", work / f"cache-{root.name}"
        cache.mkdir()
        overrides = [f"data.cache_dir={cache}"]
        user = None
        if root is unreadable:
            for p in (run_dir.parent, cache):
                p.chmod(0o777)
            root.chmod(0o000)
            user = 65534
        run = launch(1, config, run_dir, overrides=overrides, env={"SWA_DATA_ROOT": str(root), "HOME": str(cache)},
                     user=user)
        table.add(order + i / 10, fault, where, run, checkpoint_state(run_dir), "n/a (no checkpoint: the data never loaded)",
                  None, expect_rc=1, message_has=words)
        if root is unreadable:
            root.chmod(0o755)


def config_faults(order, table, work, refs):
    """Configs and launches that do not fit: world size, another config, one process more or fewer."""
    swap = work / "swap.yaml"
    run = launch(2, swap, work / "workers3", overrides=["method.workers=3"])
    table.add(order, "config not matching the world size", "method.workers=3 launched on 2 processes", run,
              checkpoint_state(work / "workers3"), "n/a (refused before training)", None, expect_rc=2,
              message_has=["workers", "divide"])
    ref_dir = refs["swap_dir"]
    before = {p: p.stat().st_mtime_ns for p in ref_dir.rglob("*")}
    run = launch(2, swap, ref_dir, overrides=["optim.lr=0.07"])
    untouched = before == {p: p.stat().st_mtime_ns for p in ref_dir.rglob("*")}
    ckpt = checkpoint_state(ref_dir)
    table.add(order + 0.1, "resume with a different config", "the finished SWAP run's command with optim.lr=0.07 added", run,
              (ckpt[0] and untouched, ckpt[1] + ("; run directory untouched" if untouched else "; **modified**")),
              "n/a (refused; the original command still resumes)", None, expect_rc=2,
              message_has=["optim.lr", "another config"])
    sgd = work / "sgd.yaml"
    run_dir = work / "sgd-2ranks"
    first = launch(2, sgd, run_dir, overrides=["run.stop_after_epochs=1"])
    assert first.rc == 0, first.stderr[-2000:]
    for np in (3, 1):
        run = launch(np, sgd, run_dir)
        table.add(order + 0.2 + np / 100, f"mpirun with one {'more' if np == 3 else 'fewer'} process than the checkpoint",
                  f"checkpoint of 2 ranks, launched with {np}", run, checkpoint_state(run_dir),
                  "n/a (refused; 2 processes resume it)", None, expect_rc=2,
                  message_has=["written by 2 processes"])


# ---------------------------------------------------------------------------- load

def load_test(work, steps: int = 200) -> list[str]:
    """4 ranks checkpoint after every step (1 step an epoch) while this process loads `latest` in a loop."""
    config = write_config(work, "sgd", {"data": {"train_subset": 32}, "optim": {"batch_size": 8},
                                        "schedule": {"epochs": steps}, "eval": {"every_epochs": steps},
                                        "model": {"name": "tiny_cnn_no_bn"},
                                        "run": {"keep_checkpoints": 2, "log_every_steps": 50}}, name="load")
    run_dir = work / "load"
    directory = run_dir / "checkpoints"
    stats = {"loads": 0, "unreadable": 0, "pruned_before_open": 0, "max_generations": 0, "errors": []}
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
            gens = [p for p in directory.iterdir() if p.is_dir()]
            stats["max_generations"] = max(stats["max_generations"], len(gens))
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
                stats["loads"] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    start = time.monotonic()
    run = launch(4, config, run_dir)
    done.set()
    thread.join()
    wall = time.monotonic() - start
    final = sorted(p.name for p in directory.iterdir() if p.is_dir())
    return [
        "## Load: a checkpoint after every step, read concurrently",
        "",
        f"4 ranks, {steps} steps (one step an epoch, `run.checkpoint_every_epochs=1`, `run.keep_checkpoints=2`), "
        f"while one reader process loads every rank's file of the generation `latest.json` names, in a loop.",
        "",
        f"- Run: exit {run.rc}, {wall:.0f} s, {len(final)} generations left: {', '.join(final)}",
        f"- Loads of a rank file: {stats['loads']}; **unreadable: {stats['unreadable']}**"
        + (f" ({'; '.join(stats['errors'][:3])})" if stats["errors"] else ""),
        f"- A file pruned between reading the pointer and opening the file (the writer moved on twice; the "
        f"reader re-reads the pointer): {stats['pruned_before_open']}",
        f"- Most generation directories seen at once: {stats['max_generations']} (bound: keep 2 + the one being "
        f"written = 3)",
    ]


# ---------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "reliability.md"))
    parser.add_argument("--only", help="only rows whose fault contains this word (for debugging; no file written)")
    parser.add_argument("--load-steps", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4, help="scenarios run at once")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/faults.py needs root: it mounts a tmpfs (full disk) and runs as another user "
                 "(unreadable data root)")
    started = dt.datetime.now(dt.timezone.utc)
    load: list[str] = []
    table = Table(on_change=lambda: write(args, started, table, load, final=False))
    with tempfile.TemporaryDirectory(prefix="swa-faults-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        refs = {}
        write_config(work, "sgd")

        def reference(method):  # the uninterrupted results every resume is compared with
            ref_dir = work / f"reference-{method}"
            run = launch(2, write_config(work, method), ref_dir)
            assert run.rc == 0, run.stderr[-3000:]
            refs[method], refs[f"{method}_dir"] = finals(ref_dir), ref_dir

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(reference, ("swap", "hwa")))
        jobs = [(f"{c[0]}", process_fault, (table, work, refs, c)) for c in PROCESS_CASES]
        jobs += [("disk", full_disk, (table, work, refs)),
                 ("checkpoint", checkpoint_fault, (table, work, refs, "truncated")),
                 ("checkpoint", checkpoint_fault, (table, work, refs, "corrupt")),
                 ("data", data_faults, (table, work)), ("config", config_faults, (table, work, refs))]
        # Each run spends most of its time waiting for a core, not computing: a few at once (at the
        # caller's nice level) finish in a fraction of the time without taking more than their share.
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(fn, order, *fn_args) for order, (name, fn, fn_args) in enumerate(jobs)
                       if not args.only or args.only in name]
            if not args.only or "load" in args.only:
                futures.append(pool.submit(lambda: load.extend(load_test(work, args.load_steps))))
            for f in futures:
                f.result()
    write(args, started, table, load, final=True)


def write(args, started, table: Table, load: list[str], final: bool) -> None:
    """The whole document; until the last row is in, it says it is partial (a killed run leaves what it had)."""
    lines = [
        "# Reliability: faults injected into runs, one at a time",
        *([] if final else ["", f"**Partial: {len(table.rows)} rows so far; the run that writes this file "
                                f"had not finished.**"]),
        "",
        f"- Command: `./run.sh python benchmarks/faults.py` ({(dt.datetime.now(dt.timezone.utc) - started).seconds // 60} min)",
        f"- Machine: {machine_description()}; load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the cores are shared)",
        f"- Commit: {git_commit()}",
        f"- Date: {started.isoformat(timespec='seconds')}",
        "",
        "Tiny runs (2 ranks under mpirun, Horovod, CPU; a small CNN on 128 CIFAR-10 images) of SWAP "
        "(phase 1: 2 epochs x 4 steps; phase 2: 2 workers x 16 steps) and HWA (2 groups, a cycle every 4 steps, "
        "window 2), faults injected by `tests/mpi_scripts/fault_inject.py` at a chosen step. *Time to exit* runs "
        "from the fault to the end of mpirun (from the start of the command for a fault present before it). "
        "*Last checkpoint*: every rank's file of the generation `latest.json` names loads, after the fault. "
        "*Resume*: the same command again, without the fault, ends with final weights (the method's output and "
        "the training model) bitwise equal to the run that never met a fault. Exit 75 is the documented "
        "\"preempted, run me again\" code, 2 a config or launch that does not fit (nothing touched), 1 a failure.",
        "",
        *table.markdown(),
        "",
        *load,
        "",
    ]
    text = "\n".join(lines)
    if final:
        print(text)
    if not args.only:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
