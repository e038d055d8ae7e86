"""Cost of SWALP block-floating-point quantization, measured side by side.

(a) quantize() throughput in GB/s of fp32 read, for small and big blocks and both
    roundings, eager and fused (one torch.compile'd kernel), next to Tensor.copy_ on the
    same tensor in the same run (as a ratio).
(b) one 8-bit training step (quantized activations, errors and QuantizedSGD), eager and
    fused, against the fp32 step of the same model and batch, and a step with only the
    activation / error quantizers, interleaved, ratio of medians.
All measurements are interleaved, because the machine is shared and noisy. Writes
results/quantize_cpu.md (or results/quantize_gpu.md with --device cuda). Takes about 4
minutes on 2 cores, most of it compiling the fused kernels.

    ./run.sh python benchmarks/quantize.py [--repeats 3] [--train-repeats 5] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swa_lib.quant import BlockFloat, QuantizedSGD, insert_quantizers, quantize  # noqa: E402
from swa_lib.run_log import git_commit, machine_description  # noqa: E402

SIZES = (1 << 20, 1 << 22, 1 << 24)
ROWS = 512  # small blocks: 512 slices along dim 0, like the filters of a conv layer
FORMATS = [BlockFloat(8, block, rounding)
           for block in ("small", "big") for rounding in ("nearest", "stochastic")]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(wall seconds, process CPU seconds). CPU time counts only our own work, so it
    is the steadier of the two when other people load the machine (on a GPU it only
    counts the host's part and the wall time is the measurement)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(samples):
    return tuple(statistics.median(column) for column in zip(*samples))


def measure_quantize(repeats: int, device: torch.device, sizes):
    """Rows of (elements, label, GB/s, wall ratio to copy_, CPU-time ratio to copy_)."""
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    for size in sizes:
        x = torch.randn(ROWS, size // ROWS, generator=generator, device=device)
        out = torch.empty_like(x)
        jobs = {"copy_": lambda: out.copy_(x)}
        for fused in (False, True):
            for fmt in FORMATS:
                jobs[f"{fmt.block}/{fmt.rounding}" + (" fused" if fused else "")] = (
                    lambda fmt=fmt, fused=fused: quantize(x, fmt, generator, fused))
        for job in jobs.values():
            job()  # warm-up: allocator, page faults, compiling the fused kernels
        times = {name: [] for name in jobs}
        for _ in range(repeats):
            for name, job in jobs.items():
                times[name].append(timed(job, device))
        gigabytes = x.numel() * 4 / 1e9
        copy_wall, copy_cpu = medians(times["copy_"])
        for name in jobs:
            wall, cpu = medians(times[name])
            rows.append((size, name, gigabytes / wall, copy_wall / wall, copy_cpu / cpu))
    return rows


def train_step(model, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def measure_training(repeats: int, batch_size: int, device: torch.device):
    """(median, minimum) wall seconds per step for fp32 and the 8-bit variants."""
    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18(num_classes=10).to(device)
    small = BlockFloat(8, "small", "stochastic")
    # SWALP official code: activations and errors in big blocks (its quantizer module
    # ignores the small-block flag); weights, grads, momentum, accumulator small blocks.
    big = BlockFloat(8, "big", "stochastic")
    generator = torch.Generator(device).manual_seed(1)
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    variants = {"fp32": (fp32, torch.optim.SGD(fp32.parameters(), **sgd))}
    for fused in (False, True):
        suffix = " fused" if fused else ""
        act_err_only = insert_quantizers(copy.deepcopy(fp32), big, big, generator=generator,
                                         fused=fused)
        low = insert_quantizers(copy.deepcopy(fp32), big, big, generator=generator, fused=fused)
        variants["8-bit act/err, fp32 SGD" + suffix] = (
            act_err_only, torch.optim.SGD(act_err_only.parameters(), **sgd))
        variants["8-bit" + suffix] = (low, QuantizedSGD(
            torch.optim.SGD(low.parameters(), **sgd), fmt_weight=small, fmt_grad=small,
            fmt_momentum=small, fmt_acc=small, generator=generator, fused=fused))
    batch = (torch.randn(batch_size, 3, 32, 32, device=device),
             torch.randint(0, 10, (batch_size,), device=device))
    for model, optimizer in variants.values():
        model.train()
        for _ in range(2):
            train_step(model, optimizer, batch)  # warm-up, compiling the fused kernels
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, optimizer) in variants.items():
            times[name].append(
                timed(lambda: train_step(model, optimizer, batch), device)[0])
    # The minimum is the run least disturbed by other people's jobs; both are shown.
    return {name: (statistics.median(walls), min(walls)) for name, walls in times.items()}


def provenance(command: str, device: torch.device) -> list:
    pending = subprocess.run(["git", "status", "--porcelain", "swa_lib/quant"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
    commit = git_commit() + (" (swa_lib/quant not yet committed)" if pending else "")
    return [f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: {machine_description()}; device: {device_name(device)}; "
            f"torch threads: {torch.get_num_threads()}; load average at start: "
            f"{os.getloadavg()[0]:.1f} (shared machine)",
            f"- torch {torch.__version__}, torchvision {torchvision.__version__}",
            f"- git commit: {commit}",
            f"- command: `{command}`"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved quantize runs")
    parser.add_argument("--train-repeats", type=int, default=5,
                        help="interleaved training steps per variant (3 variants)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="shared 2-core machine")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None,
                        help="default: results/quantize_cpu.md or results/quantize_gpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    out = args.out or str(ROOT / "results" / f"quantize_{'gpu' if on_gpu else 'cpu'}.md")
    # A GPU needs larger tensors to reach its copy bandwidth.
    sizes = SIZES + ((1 << 26),) if on_gpu else SIZES

    lines = [f"# SWALP quantization cost on the {'GPU' if on_gpu else 'CPU'}", ""]
    lines += provenance("python " + " ".join(sys.argv), device)
    lines += ["", "## (a) quantize() throughput, GB/s of fp32 read "
              f"(median of {args.repeats} interleaved runs)", "",
              f"Small blocks: {ROWS} slices along dim 0. Ratio = quantize throughput / "
              "copy_ throughput on the same tensor in the same run, by wall time and by "
              "process CPU time.", "",
              "| elements | variant | GB/s (wall) | ratio to copy_ (wall) | "
              "ratio to copy_ (CPU time) |", "|---:|---|---:|---:|---:|"]
    for size, name, rate, wall_ratio, cpu_ratio in measure_quantize(args.repeats, device, sizes):
        lines.append(f"| {size // (1 << 20)}M | {name} | {rate:.2f} | {wall_ratio:.3f} | "
                     f"{cpu_ratio:.3f} |")
        print(lines[-1], flush=True)
    steps = measure_training(args.train_repeats, args.batch, device)
    lines += ["", f"## (b) one training step, torchvision resnet18, 10 classes, 32x32, "
              f"batch {args.batch} ({args.train_repeats} interleaved steps each)", "",
              "8-bit: activations and errors big-block, weights / gradients / momentum / "
              "accumulator small-block, all wl 8, stochastic rounding.", "",
              "| variant | median s / step | min s / step |", "|---|---:|---:|"]
    lines += [f"| {name} | {med:.3f} | {low:.3f} |" for name, (med, low) in steps.items()]
    lines += [""]
    for name in [name for name in steps if name != "fp32"]:
        med, low = (ours / fp32 for ours, fp32 in zip(steps[name], steps["fp32"]))
        lines.append(f"- {name} / fp32 step time: **{med:.2f}x** (medians), "
                     f"**{low:.2f}x** (minimums)")
    print("\n".join(lines[-14:]), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
