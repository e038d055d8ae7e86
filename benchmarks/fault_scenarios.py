"""The fault scenarios of benchmarks/faults.py: each runs its faulted runs and adds its rows to a Table.

`refs` holds the uninterrupted runs every resume is compared with: refs["swap"], refs["hwa"] (final
weights) and refs["swap_dir"] (the finished SWAP run's directory). Configs are written by faults.main.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from benchmarks.fault_harness import Run, Table, checkpoint_state, data_root_default, finals, launch, same_weights  # noqa: F401
from test_preemption import write_config


def resume_and_compare(np, config, run_dir, reference, overrides=()) -> tuple[str, bool]:
    again = launch(np, config, run_dir, overrides=overrides)
    if again.rc != 0:
        return f"no: rerun exited {again.rc}: `{again.cause()[:120]}`", False
    ok = same_weights(run_dir, reference)
    return ("yes, bitwise (same command again)" if ok else "**no**: final weights differ"), ok


P1, P2, HWA = "SWAP phase 1 (epoch 0, batch 3 of 4)", "SWAP phase 2 (epoch 2, batch 5 of 16)", \
    "HWA, mid-cycle, 2 averages in the window (epoch 1, batch 3 of 8)"
# name: (fault, ranks, step, method, where, expected exit, words the message must hold)
PROCESS_CASES = {
    "sigkill_swap1": ("sigkill", "1", 3, "swap", f"rank 1 after step 3: {P1}", None, ["signal 9"]),
    "sigkill_swap2": ("sigkill", "1", 13, "swap", f"rank 1 after step 13: {P2}", None, ["signal 9"]),
    "sigkill_hwa": ("sigkill", "1", 11, "hwa", f"rank 1 after step 11: {HWA}", None, ["signal 9"]),
    "sigkill_swap3": ("sigkill_phase3", "1", 40, "swap", "rank 1 in SWAP phase 3, after the workers' average and "
                      "before its BN recompute (after step 40, the last of phase 2)", None, ["signal 9"]),
    "sigkill_checkpoint": ("sigkill_checkpoint", "1", 5, "swap", "rank 1, half-way through writing its file of the "
                           "phase-1 -> 2 checkpoint (step 8)", None, ["signal 9"]),
    "sigterm_swap1_one": ("sigterm", "1", 3, "swap", f"rank 1 only, after step 3: {P1}", 75, ["preempted", "signal"]),
    "sigterm_swap1_all": ("sigterm", "all", 3, "swap", f"every rank, after step 3: {P1}", 75, ["preempted", "signal"]),
    "sigterm_swap2_one": ("sigterm", "1", 13, "swap", f"rank 1 only, after step 13: {P2}", 75,
                          ["preempted", "signal"]),
    "sigterm_swap2_all": ("sigterm", "all", 13, "swap", f"every rank, after step 13: {P2}", 75,
                          ["preempted", "signal"]),
    "sigterm_hwa_one": ("sigterm", "1", 11, "hwa", f"rank 1 only, after step 11: {HWA}", 75, ["preempted", "signal"]),
    "sigterm_hwa_all": ("sigterm", "all", 11, "hwa", f"every rank, after step 11: {HWA}", 75, ["preempted", "signal"]),
    "sigint": ("sigint", "0", 3, "swap", f"rank 0 only (Ctrl-C), after step 3: {P1}", 75, ["preempted"]),
    "nan": ("nan", "1", 5, "swap", "rank 1's first weight tensor set to NaN after step 5 (SWAP phase 1)", 1, ["nan"]),
}


def process_fault(order, table, work, refs, case):
    """Signals, kills and NaN in SWAP and HWA runs of 2 ranks."""
    fault, ranks, step, method, where, rc, words = case
    run_dir = work / f"{fault}-{ranks.replace(',', '_')}-{method}-{step}"
    config = work / f"{method}.yaml"  # written once by main: runs in parallel read it
    run = launch(2, config, run_dir, fault, ranks, step)
    ckpt = checkpoint_state(run_dir)
    resume, ok = resume_and_compare(2, config, run_dir, refs[method])
    name = fault.upper().replace("_PHASE3", "").replace("NAN", "NaN on one rank")
    table.add(order, name.replace("_CHECKPOINT", " during a checkpoint write"), where, run, ckpt, resume, ok,
              expect_rc=rc, message_has=words)


def full_disk(order, table, work, refs, keep=False):
    """A full disk while every rank writes its checkpoint file: the previous generation must survive."""
    mount = work / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    try:
        config = work / "swap.yaml"
        run_dir = mount / "run"
        run = launch(2, config, run_dir, "fill_disk", "all", 5)
        ckpt = checkpoint_state(run_dir)
        (mount / "filler").unlink()  # the user frees space, then runs the same command again
        resume, ok = resume_and_compare(2, config, run_dir, refs["swap"])
        table.add(order, "disk full during a checkpoint write", "a 32 MB tmpfs holding the run directory, filled by "
                  "another file just before the phase-1 -> 2 checkpoint (step 8) is written; every rank then "
                  "writes its file", run, ckpt, resume + " after freeing space", ok, expect_rc=1,
                  message_has=["no space"])
    finally:
        if keep:
            print(f"kept: {mount} (mounted; umount it when done)", flush=True)
        else:
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
    baseline = launch(2, config, work / f"ready-{kind}", "ready")
    run = launch(2, config, run_dir)
    older = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir() and p.name != tag)
    pointer = run_dir / "checkpoints" / "latest.json"
    info = json.loads(pointer.read_text())
    info["tag"] = older[-1]  # what the message tells the user to do
    pointer.write_text(json.dumps(info))
    ckpt = checkpoint_state(run_dir)
    ckpt = (ckpt[0], f"older generation {ckpt[1]}")
    resume, ok = resume_and_compare(2, config, run_dir, refs["swap"])
    damage = "half its bytes" if kind == "truncated" else "random bytes"
    table.add(order, f"{kind} checkpoint file", f"{victim.relative_to(run_dir)} ({damage}), then the same command",
              run, ckpt, resume + " after pointing latest.json at the older generation as the message says", ok,
              expect_rc=1, message_has=["cannot be read", victim.name], baseline=baseline)


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
    # The startup cost these rows' times include: the same config, the real data from the warm cache.
    baseline = launch(1, config, work / "ready-data", "ready")
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
        table.add(order + i / 10, fault, where, run, checkpoint_state(run_dir),
                  "n/a (no checkpoint: the data never loaded)", None, expect_rc=1, message_has=words,
                  baseline=baseline)
        if root is unreadable:
            root.chmod(0o755)


def config_faults(order, table, work, refs):
    """Configs and launches that do not fit: world size, another config, one process more or fewer."""
    swap = work / "swap.yaml"
    baseline = launch(2, swap, work / "ready-config", "ready")  # what the same launch costs without the fault
    run = launch(2, swap, work / "workers3", overrides=["method.workers=3"])
    table.add(order, "config not matching the world size", "method.workers=3 launched on 2 processes", run,
              checkpoint_state(work / "workers3"), "n/a (refused before training)", None, expect_rc=2,
              message_has=["method.workers", "do not divide the 2 launched processes"], baseline=baseline)
    ref_dir = refs["swap_dir"]
    before = {p: p.stat().st_mtime_ns for p in ref_dir.rglob("*")}
    run = launch(2, swap, ref_dir, overrides=["optim.lr=0.07"])
    untouched = before == {p: p.stat().st_mtime_ns for p in ref_dir.rglob("*")}
    ckpt = checkpoint_state(ref_dir)
    table.add(order + 0.1, "resume with a different config",
              "the finished SWAP run's command with optim.lr=0.07 added", run,
              (ckpt[0] and untouched, ckpt[1] + ("; run directory untouched" if untouched else "; **modified**")),
              "n/a (refused; the original command still resumes)", None, expect_rc=2,
              message_has=["optim.lr", "another config"], baseline=baseline)
    sgd = work / "sgd.yaml"
    run_dir = work / "sgd-2ranks"
    first = launch(2, sgd, run_dir, overrides=["run.stop_after_epochs=1"])
    assert first.rc == 0, first.stderr[-2000:]
    for np in (3, 1):
        run = launch(np, sgd, run_dir)
        table.add(order + 0.2 + np / 100,
                  f"mpirun with one {'more' if np == 3 else 'fewer'} process than the checkpoint",
                  f"checkpoint of 2 ranks, launched with {np}", run, checkpoint_state(run_dir),
                  "n/a (refused; 2 processes resume it)", None, expect_rc=2,
                  message_has=["written by 2 processes"], baseline=baseline)
