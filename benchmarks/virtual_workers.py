"""Training throughput of K models in one process (vectorised and sequential) against K processes.

For each width and K, in one run, side by side: images/s of K ResNet-9s each doing training steps
(forward + backward + SGD step with momentum) on its own synthetic CIFAR-shaped batch,
  vectorised  swa_lib.stacked.StackedWorkers: one vmapped call over the stacked weights
  sequential  swa_lib.stacked.SequentialWorkers: K modules stepped in a loop
  processes   K ranks of one mpirun job of this script (--rank-worker), one model per process,
              timed from a barrier; a cell is done when its slowest rank is (the time is the maximum)
and the ratios to processes. Synthetic tensors, not data loading: this measures the compute.

    nice -n 19 .venv/bin/python benchmarks/virtual_workers.py --out results/virtual_workers_cpu.md
    nice -n 19 .venv/bin/python benchmarks/virtual_workers.py --quick          # one width, few steps
    .venv/bin/python benchmarks/virtual_workers.py --device cuda --out results/virtual_workers_gpu.md

On a GPU the processes column is skipped: K NCCL ranks cannot share one GPU (NCCL refuses two ranks
on one device), and K processes time-slicing a GPU is not the multi-GPU setup they stand for.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import build_model  # noqa: E402
from swa_lib.run_log import git_commit, library_versions, machine_description  # noqa: E402
from swa_lib.stacked import build_workers  # noqa: E402

MODES = ("vectorised", "sequential", "processes")


def make_sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(k: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(k, batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (k, batch), generator=g)
    return x.to(device), y.to(device)


def in_process_seconds(mode: str, k: int, width: int, args, device: torch.device) -> float:
    """Seconds for args.steps training steps of K models in this process (after warmup steps)."""
    torch.manual_seed(0)
    models = [build_model("resnet9", 10, width=width).to(device).train() for _ in range(k)]
    workers = build_workers(models, make_sgd, vectorised=mode == "vectorised")
    x, y = synthetic(k, args.batch, device)
    for _ in range(args.warmup):
        workers.train_step(x, y, F.cross_entropy)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        workers.train_step(x, y, F.cross_entropy)
    sync(device)
    return time.perf_counter() - start


def mpirun_command(k: int) -> list[str]:
    flags = ["--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")  # Debian's Open MPI refuses root without it, as in run.sh
    return ["mpirun", *flags, "-np", str(k), "-x", f"PYTHONPATH={ROOT}"]


class ProcessPool:
    """One mpirun job of max(K) ranks for the whole run, so that starting K Python processes (minutes on a
    loaded machine) is paid once. For each cell the parent writes "width K" to rank 0's stdin; ranks below K
    train one model each and rank 0 answers with the slowest rank's seconds; the other ranks sleep."""

    def __init__(self, ks: list[int], args):
        cmd = mpirun_command(max(ks)) + [sys.executable, str(Path(__file__).resolve()), "--rank-worker",
                                         "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                                         str(args.warmup), "--threads", str(args.threads),
                                         "--ks", *map(str, ks)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.output: list[str] = []
        self._read_until("READY")  # all ranks started: their start-up must not overlap a measurement

    def _read_until(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
            self.output.append(line)
        raise RuntimeError(f"mpirun ended before {tag} (exit {self.proc.wait()}):\n{''.join(self.output)}")

    def seconds(self, width: int, k: int) -> float:
        self.proc.stdin.write(f"{width} {k}\n")
        self.proc.stdin.flush()
        return json.loads(self._read_until("RESULT "))["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("end\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


def rank_worker(args) -> None:
    """One rank of the processes column: for each cell it is given, one model on its own batch if its
    rank is below K, timed from a barrier of those K ranks."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    subs = {k: world.Split(int(world.rank >= k), world.rank) for k in sorted(set(args.ks))}  # every rank, in order
    if world.rank == 0:
        print("READY", flush=True)
    cell = np.zeros(2, dtype=np.int64)  # (width, K); (0, 0) ends the job
    while True:
        if world.rank == 0:
            words = sys.stdin.readline().split()
            cell[:] = [int(w) for w in words] if len(words) == 2 else [0, 0]
        request = world.Ibcast(cell, root=0)
        while not request.Test():  # sleep instead of spinning: an idle rank must not take CPU from active ones
            time.sleep(0.02)
        if cell[1] == 0:
            return
        width, k = int(cell[0]), int(cell[1])
        if world.rank >= k:
            continue
        torch.set_num_threads(max(1, args.threads // k))
        torch.manual_seed(world.rank)
        model = build_model("resnet9", 10, width=width).train()
        optimizer = make_sgd(list(model.parameters()))
        x, y = synthetic(1, args.batch, torch.device("cpu"))

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[0]), y[0]).backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        subs[k].Barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = subs[k].gather(time.perf_counter() - start, root=0)
        if world.rank == 0:
            print("RESULT " + json.dumps({"seconds": max(seconds)}), flush=True)


def report(rows: list[dict], args, threads: int, load_before, load_after, wall_s: float, device) -> str:
    has_processes = any("processes" in r["ips"] for r in rows)
    modes = [m for m in MODES if m != "processes" or has_processes]
    head = "| width | K | " + " | ".join(f"{m} (img/s)" for m in modes) + " | vectorised / sequential"
    head += " | vectorised / processes | sequential / processes |" if has_processes else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ips = r["ips"]
        cells = [f"{ips[m]:.1f}" for m in modes] + [f"{ips['vectorised'] / ips['sequential']:.2f}"]
        if has_processes:
            cells += [f"{ips['vectorised'] / ips['processes']:.2f}", f"{ips['sequential'] / ips['processes']:.2f}"]
        lines.append(f"| {r['width']} | {r['k']} | " + " | ".join(cells) + " |")
    v = library_versions()
    return "\n".join([
        f"# K models in one process vs K processes: training throughput ({device.type})", "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- Machine: {machine_description()}; `nproc` = {len(os.sched_getaffinity(0))}",
        f"- Load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{' '.join(f'{x:.2f}' for x in load_after)}. " + (
            "Other jobs shared the cores, so the absolute numbers are depressed and noisy; the ratios, measured "
            "side by side in one run, are what this table is for." if load_before[0] >= 1.0 else
            "No other job held the cores when it began (the load during the run is its own)."),
        f"- Threads: in-process runs use torch {threads} thread(s); each of the K processes uses "
        f"max(1, {threads} // K) (torch.set_num_threads); the K processes are ranks of one mpirun job started "
        f"once (idle ranks sleep); its start-up is not timed",
        f"- Work: ResNet-9 (10 classes), batch {args.batch} per model of 3x32x32 synthetic images, SGD "
        f"(momentum 0.9, nesterov, weight decay), fp32; {args.warmup} untimed warmup step(s), then "
        f"{args.steps} timed steps per cell. img/s = K x batch x steps / seconds (processes: slowest rank).",
        f"- torch {v['torch']}; mpi4py {v.get('mpi4py')}; Git commit: {git_commit()}",
        f"- Command: `nice -n {os.nice(0)} {' '.join([sys.executable] + sys.argv)}` (total {wall_s:.0f} s)",
        "", *lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 16, K = 2 and 4, 2 steps: a smoke run")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=32, help="images per model per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of an in-process run (processes: this // K each)")
    parser.add_argument("--out", type=Path, help="markdown file to write; printed either way")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    if args.quick:
        args.widths, args.ks, args.steps = [16], [2, 4], 2
    load_before = os.getloadavg()  # before the K ranks start: what else held the cores
    device = torch.device(args.device)
    with_processes = device.type == "cpu" and shutil.which("mpirun") is not None
    pool = ProcessPool(args.ks, args) if with_processes else None
    if not with_processes:
        print("processes column skipped: " + ("K NCCL ranks cannot share one GPU" if device.type == "cuda"
                                              else "no mpirun on PATH"), flush=True)
    torch.set_num_threads(args.threads)
    start, rows = time.perf_counter(), []
    for width in args.widths:
        for k in args.ks:
            images = k * args.batch * args.steps
            seconds = {m: in_process_seconds(m, k, width, args, device) for m in MODES[:2]}
            if with_processes:
                seconds["processes"] = pool.seconds(width, k)
            rows.append({"width": width, "k": k, "ips": {m: images / s for m, s in seconds.items()}})
            ips = rows[-1]["ips"]
            print(f"width {width} K {k}: " + ", ".join(f"{m} {v:.1f} img/s" for m, v in ips.items())
                  + f"; vectorised/sequential {ips['vectorised'] / ips['sequential']:.2f}"
                  + (f", vectorised/processes {ips['vectorised'] / ips['processes']:.2f}, sequential/processes "
                     f"{ips['sequential'] / ips['processes']:.2f}" if "processes" in ips else ""), flush=True)
    if pool is not None:
        pool.close()
    text = report(rows, args, args.threads, load_before, os.getloadavg(), time.perf_counter() - start, device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
