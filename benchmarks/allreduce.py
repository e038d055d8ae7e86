"""Allreduce (mean) time per message size: Horovod, torch.distributed (gloo) and plain mpi4py.

All three run in the same processes of one mpirun job: for every size and repetition the
backends take turns (in rotating order), each timed from an MPI barrier to its return on
every rank. A repetition's time is the slowest rank's; the table reports the median over
repetitions and the ratio to the fastest backend. Horovod and gloo go through
swa_lib.comm (what the library uses: Horovod with dynamic process sets and named ops,
gloo as sum then divide); mpi4py is Allreduce(IN_PLACE, SUM) on a numpy buffer, then a divide.

    mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 \\
        .venv/bin/python benchmarks/allreduce.py --out results/allreduce_cpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swa_lib.comm import init_comm  # noqa: E402
from swa_lib.run_log import git_commit, library_versions, machine_description  # noqa: E402

SIZES_BYTES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
BACKENDS = ("horovod", "torch (gloo)", "mpi4py")


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def make_ops(hvd_comm, torch_comm, mpi, numel: int, rank: int, size: int) -> dict:
    """One zero-argument allreduce-mean callable per backend, each on its own float32 buffer."""
    bufs = {"horovod": torch.full((numel,), rank + 1.0), "torch (gloo)": torch.full((numel,), rank + 1.0),
            "mpi4py": np.full(numel, rank + 1.0, dtype=np.float32)}

    def mpi_mean():
        mpi.COMM_WORLD.Allreduce(mpi.IN_PLACE, bufs["mpi4py"], op=mpi.SUM)
        bufs["mpi4py"] /= size

    ops = {"horovod": lambda: hvd_comm.allreduce_([bufs["horovod"]], "mean"),
           "torch (gloo)": lambda: torch_comm.allreduce_([bufs["torch (gloo)"]], "mean"),
           "mpi4py": mpi_mean}
    expected = (size + 1) / 2  # mean of 1..size: checks that each backend did the real work
    for name, op in ops.items():
        op()
        got = float(bufs[name][0]), float(bufs[name][-1])
        if not all(abs(g - expected) < 1e-5 for g in got):
            raise RuntimeError(f"{name} allreduce gave {got}, expected {expected}")
    return ops


def measure(ops: dict, reps: int, mpi) -> dict[str, list[float]]:
    """Seconds per call on this rank, per backend, with backends interleaved in rotating order."""
    times = {name: [] for name in ops}
    names = list(ops)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            mpi.COMM_WORLD.Barrier()
            start = time.perf_counter()
            ops[name]()
            times[name].append(time.perf_counter() - start)
    return times


def table(seconds: dict[int, dict[str, float]], reps: dict[int, int]) -> str:
    head = "| size | reps | " + " | ".join(f"{b} (ms)" for b in BACKENDS) + " | " \
        + " | ".join(f"{b} / fastest" for b in BACKENDS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(BACKENDS))]
    for nbytes, per in seconds.items():
        fastest = min(per.values())
        lines.append(f"| {human(nbytes)} | {reps[nbytes]} | "
                     + " | ".join(f"{per[b] * 1e3:.3f}" for b in BACKENDS) + " | "
                     + " | ".join(f"{per[b] / fastest:.2f}" for b in BACKENDS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="markdown file to write (rank 0); printed if omitted")
    parser.add_argument("--reps", type=int, default=100, help="repetitions per size (fewer from 4 MB up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per backend and size")
    args = parser.parse_args()
    os.environ["SWA_TORCH_BACKEND"] = "gloo"  # the CPU comparison, even where a GPU exists
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    hvd_comm = init_comm("horovod")  # Distributed: Horovod and torch.distributed side by side,
    torch_comm = init_comm("torch")  # the torch address travels over mpi4py
    from mpi4py import MPI
    rank, size = hvd_comm.rank, hvd_comm.size

    medians, minima, reps_used = {}, {}, {}
    for nbytes in SIZES_BYTES:
        reps = max(8, min(args.reps, (256 << 20) // nbytes))  # about 256 MB per backend at most
        ops = make_ops(hvd_comm, torch_comm, MPI, nbytes // 4, rank, size)
        measure(ops, args.warmup, MPI)
        mine = measure(ops, reps, MPI)
        everyone = MPI.COMM_WORLD.gather(mine, root=0)
        if rank == 0:
            # A collective is done when its slowest rank is done.
            slowest = {b: [max(r[b][i] for r in everyone) for i in range(reps)] for b in BACKENDS}
            medians[nbytes] = {b: statistics.median(t) for b, t in slowest.items()}
            minima[nbytes] = {b: min(t) for b, t in slowest.items()}
            reps_used[nbytes] = reps

    if rank == 0:
        versions = library_versions()
        report = "\n".join([
            "# Allreduce (mean) on CPU: Horovod vs torch.distributed (gloo) vs mpi4py", "",
            f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- Machine: {machine_description()}; `nproc` = {len(os.sched_getaffinity(0))}; "
            f"load average before: {' '.join(load_before)}, after: "
            f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} (the cores are shared)",
            f"- World size: {size} ranks on {size // hvd_comm.local_size} host(s); "
            f"torch threads per rank: {torch.get_num_threads()}; OMPI_MCA_mpi_yield_when_idle="
            f"{os.environ.get('OMPI_MCA_mpi_yield_when_idle')} (set by swa_lib.comm.init_comm)",
            f"- Open MPI: {MPI.Get_library_version().replace(chr(0), '').splitlines()[0].strip()}; "
            f"mpi4py {versions['mpi4py']}; "
            f"torch {versions['torch']}; horovod {versions['horovod']}; numpy {versions['numpy']}",
            f"- Git commit: {git_commit()}",
            f"- Command (rank 0's argv, under mpirun -np {size}): `{' '.join([sys.executable] + sys.argv)}`",
            "", "Median over repetitions of the slowest rank's time per call, float32 buffers.",
            "Horovod and gloo go through `swa_lib.comm.allreduce_` (Horovod: dynamic process-set mode,",
            "a fixed name per call shape; gloo: SUM then divide). mpi4py: `Allreduce(IN_PLACE, SUM)`",
            "on a numpy buffer, then divide. Backends take turns within each repetition.", "",
            table(medians, reps_used), "",
            "The same repetitions, best (minimum) instead of median: what each backend costs when",
            "no other process on the shared cores gets in the way.", "",
            table(minima, reps_used), ""])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report)
        print(report, flush=True)
    torch_comm.shutdown()
    hvd_comm.shutdown()


if __name__ == "__main__":
    main()
