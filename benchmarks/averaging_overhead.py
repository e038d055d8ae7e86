"""Cost of one LAWA / EMA update per training step, and of the same EMA through torch's AveragedModel.

torchvision ResNet-18 (10 classes) on CIFAR-shaped batches (32x32, batch 64), SGD with
momentum, everything in memory. Each repeat measures, back to back so machine noise hits all
alike: a few plain training steps; the same number of steps each followed by an EMA and a
LAWA update (nu = 1, the worst case); and the update calls alone for our EMA, our LAWA and
`AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)`. Reported:
medians over repeats and the median of per-repeat ratios. Targets: an update costs at most 1%
of a step, and our EMA is no slower than AveragedModel's. Writes results/averaging_overhead_cpu.md.

With --device cuda the model is on the GPU and two more variants run: training steps each
followed by an EMA and a LAWA update whose buffers are in pinned host memory
(buffer_device="cpu": device-to-host copies on a side stream, non_blocking), and those two
updates timed alone; every timing then ends with a device synchronize, so the step time
with and without averaging includes any wait for the copies. Writes
results/averaging_overhead_gpu.md.

    ./run.sh python benchmarks/averaging_overhead.py [--repeats 9] [--steps 3] [--updates 20]
        [--device cuda --batch 128]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swa_lib.averaging import EMA, LAWA  # noqa: E402
from swa_lib.run_log import git_commit, machine_description  # noqa: E402


def timed(fn, times: int, device: torch.device) -> float:
    """Seconds per call of fn, over `times` calls (queued GPU work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(times):
        fn()
    sync()
    return (time.perf_counter() - start) / times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="training steps per repeat and variant")
    parser.add_argument("--updates", type=int, default=20, help="update calls per repeat when timed alone")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=20, help="LAWA L (the update cost does not depend on it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (this machine has 2 cores)")
    parser.add_argument("--out", default=None,
                        help="default: results/averaging_overhead_cpu.md or results/averaging_overhead_gpu.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    out = args.out or str(ROOT / "results" / f"averaging_overhead_{'gpu' if on_gpu else 'cpu'}.md")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    ema = EMA(model, every_steps=1, decay=0.9)
    lawa = LAWA(model, every_steps=1, window=args.window)
    if on_gpu:  # the same averages with pinned host buffers, filled asynchronously
        ema_host = EMA(model, every_steps=1, decay=0.9, buffer_device="cpu")
        lawa_host = LAWA(model, every_steps=1, window=args.window, buffer_device="cpu")
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    counter = [0]

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def updater(average):
        """One update call of `average`, at the next step number."""
        def update():
            counter[0] += 1
            average.update(model, counter[0])
        return update

    def step_then(*updates):
        def run():
            step()
            for update in updates:
                update()
        return run

    ours_ema, ours_lawa = updater(ema), updater(lawa)
    step_with_averages = step_then(ours_ema, ours_lawa)
    if on_gpu:
        host_ema, host_lawa = updater(ema_host), updater(lawa_host)
        step_with_host_averages = step_then(host_ema, host_lawa)

    variants = {"step": lambda: timed(step, args.steps, device),
                "step + EMA + LAWA": lambda: timed(step_with_averages, args.steps, device),
                "EMA update (ours)": lambda: timed(ours_ema, args.updates, device),
                "LAWA update (ours)": lambda: timed(ours_lawa, args.updates, device),
                "EMA update (AveragedModel)": lambda: timed(lambda: averaged.update_parameters(model),
                                                            args.updates, device)}
    if on_gpu:
        variants.update({
            "step + EMA + LAWA (pinned CPU buffers)": lambda: timed(step_with_host_averages, args.steps, device),
            "EMA update (pinned CPU buffers)": lambda: timed(host_ema, args.updates, device),
            "LAWA update (pinned CPU buffers)": lambda: timed(host_lawa, args.updates, device)})
    for fn in variants.values():  # warm-up: allocator, first AveragedModel call (a plain copy)
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = lambda a, b: statistics.median(p / q for p, q in zip(times[a], times[b]))  # noqa: E731
    n_params = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    where = (f"{torch.cuda.get_device_name(device)} (fp32, no autocast), {args.threads} CPU threads"
             if on_gpu else f"1 process, {args.threads} threads")
    lines = [f"# LAWA / EMA update overhead vs a training step, and vs torch's AveragedModel "
             f"({'GPU' if on_gpu else 'CPU'})", "",
             f"torchvision ResNet-18 (10 classes, {n_params / 1e6:.1f} M averaged floats: parameters and BN "
             f"statistics), batch {args.batch} of 32x32, SGD with momentum, {where}. "
             f"{args.repeats} interleaved repeats; each times {args.steps} training steps per step variant and "
             f"{args.updates} calls per update variant. Every update runs at nu = 1 (every step, the worst "
             f"case); LAWA L = {args.window}.", "",
             "| what | median ms | per repeat (ms) |", "|---|---|---|"]
    lines += [f"| {name} | {1e3 * med[name]:.2f} | {', '.join(f'{1e3 * t:.1f}' for t in times[name])} |"
              for name in variants]
    in_loop = ratio("step + EMA + LAWA", "step") - 1
    lines += ["", "| ratio (median of per-repeat ratios) | value |", "|---|---|",
              f"| EMA update (ours) / step | {100 * ratio('EMA update (ours)', 'step'):.2f}% |",
              f"| LAWA update (ours) / step | {100 * ratio('LAWA update (ours)', 'step'):.2f}% |",
              f"| EMA update (AveragedModel) / step | {100 * ratio('EMA update (AveragedModel)', 'step'):.2f}% |",
              f"| EMA ours / AveragedModel | {ratio('EMA update (ours)', 'EMA update (AveragedModel)'):.2f}x |",
              f"| step with EMA + LAWA / plain step - 1 (in the loop, noisier) | {100 * in_loop:+.2f}% |"]
    if on_gpu:
        lines += [
            "| EMA update, pinned CPU buffers / step | "
            f"{100 * ratio('EMA update (pinned CPU buffers)', 'step'):.2f}% |",
            f"| LAWA update, pinned CPU buffers / step | "
            f"{100 * ratio('LAWA update (pinned CPU buffers)', 'step'):.2f}% |",
            f"| step with EMA + LAWA on pinned CPU buffers / plain step - 1 | "
            f"{100 * (ratio('step + EMA + LAWA (pinned CPU buffers)', 'step') - 1):+.2f}% |"]
    lines += ["",
              "Targets: an update at most 1% of a step; our EMA no slower than AveragedModel's "
              "(both are one `torch._foreach_lerp_` over the same tensors; ours writes into views of one flat "
              "vector, and LAWA's update is one copy into its ring slot). With nu = 64-128 (the paper's "
              "setting) the cost per step is that divided by nu.", "",
              f"- command: `./run.sh python benchmarks/averaging_overhead.py --repeats {args.repeats} "
              f"--steps {args.steps} --updates {args.updates} --batch {args.batch} --window {args.window}"
              f"{' --device ' + args.device if on_gpu else ''}`",
              f"- machine: {machine_description()}; load average at start: {os.getloadavg()[0]:.1f}",
              f"- torch {torch.__version__}", f"- commit: `{git_commit()}`", f"- date: {dt.date.today().isoformat()}"]
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
