"""What changes the bits of a CPU training run, measured: threads, kernel instruction sets, data cache, JPEG decoder.

Training: one short real run through the project's loop, repeated under each factor: ResNet-9
at width 8 on 2,000 images of the CIFAR-10 JPEG copy, batch 32, 2 epochs (124 SGD steps), with
the reduced baselines config (configs/baselines/cifar10_resnet9_sgd_reduced.yaml) otherwise.
Every variant runs in a fresh process, so that what torch reads at start-up takes effect:
OMP_NUM_THREADS (threads), ATEN_CPU_CAPABILITY (ATen's vectorised kernels: batch norm,
element-wise ops, the optimizer), ONEDNN_MAX_CPU_ISA (oneDNN: the convolutions) and
MKL_ENABLE_INSTRUCTIONS (MKL: matrix products). Capping an instruction set at AVX2 is what a
CPU without AVX-512 would run. The final weights (every parameter and buffer) are compared with
the reference run's, bitwise and by the largest absolute difference, and the test accuracy on
1,000 test images shows what a difference does to a reported number.

Data: the decoded-array cache is built again from the archive into an empty directory and
compared with the cache the runs read; the first --decode-images training JPEGs are decoded
again by libjpeg-turbo without SIMD (JSIMD_FORCENONE=1) and by torchvision's own libjpeg, and
compared pixel by pixel with Pillow's decode (the one the cache holds).

    ./run.sh python benchmarks/determinism.py [--epochs 2] [--train 2000] [--jobs 1] [--out results/determinism_cpu.md]

About 3 minutes of CPU in all (the 2-thread run uses two cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.archive import decode_rgb, iter_tar_files  # noqa: E402
from data.cache import resolve_cache_dir  # noqa: E402
from data.cifar10_jpg import find_files, load_cifar10_jpg, read_index  # noqa: E402
from swa_lib.run_log import git_commit, machine_description, numerics_record  # noqa: E402

CONFIG = ROOT / "configs" / "baselines" / "cifar10_resnet9_sgd_reduced.yaml"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# (name, environment on top of OMP_NUM_THREADS=1, config overrides); the first is the reference.
VARIANTS = [
    ("reference: 1 thread, every library at this CPU's best instruction set", {}, []),
    ("the same, again (a new process)", {}, []),
    ("2 threads", {"OMP_NUM_THREADS": "2"}, []),
    ("ATen kernels capped at AVX2", {"ATEN_CPU_CAPABILITY": "avx2"}, []),
    ("oneDNN convolutions capped at AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    ("MKL capped at AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, []),
    ("all three capped at AVX2 (a CPU without AVX-512)", AVX2, []),
    ("another seed (run.seed=1), for scale", {}, ["run.seed=1"]),
]


def train_overrides(args) -> list[str]:
    return [f"data.train_subset={args.train}", "data.test_subset=1000", "model.kwargs={width: 8}",
            "optim.batch_size=32", f"schedule.epochs={args.epochs}", f"eval.every_epochs={args.epochs}",
            "run.progress=false", "run.checkpoint_every_epochs=0", "run.seed=0"]


# ---------------------------------------------------------------------------- worker processes
def train_worker(result: Path, overrides: list[str]) -> None:
    """One run with the environment this process was started with; weights and accuracy to `result`."""
    from swa_lib.cli import build_trainer
    from swa_lib.comm import init_comm
    from swa_lib.config import load_config

    cfg = load_config(CONFIG, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, init_comm("single"), Path(run_dir) / "run")
        start = time.perf_counter()
        summary = trainer.fit()
        seconds = time.perf_counter() - start
        trainer.logger.close()
    torch.save({"state": trainer.ctx.model.state_dict(), "acc": summary["final"]["output/acc"],
                "steps": summary["steps"], "seconds": seconds, "numerics": numerics_record()}, result)


def training_jpegs(count: int) -> list[bytes]:
    """The first `count` training JPEGs in the official order (the order of the cache's arrays)."""
    tar_path, csv_path = find_files(data_root())
    wanted = {path: i for i, (path, _) in enumerate(read_index(csv_path)["train"][:count])}
    blobs: list[bytes | None] = [None] * count
    for name, blob in iter_tar_files(tar_path):
        if name in wanted:
            blobs[wanted[name]] = blob
    return blobs


def decode_worker(result: Path, count: int) -> None:
    """Pillow's decode of the first `count` training JPEGs, as N x 3 x 32 x 32 (the cache's layout)."""
    pixels = np.stack([decode_rgb(blob, f"train image {i}") for i, blob in enumerate(training_jpegs(count))])
    np.save(result, pixels.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------- measurements
def data_root() -> Path:
    from swa_lib.config import load_config
    from swa_lib.workload import data_root as configured_root

    return configured_root(load_config(CONFIG, []))


def run_variant(env_extra: dict, overrides: list[str], workdir: Path, index: int) -> dict:
    result = workdir / f"variant{index}.pt"
    env = {k: v for k, v in os.environ.items() if k not in AVX2}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra})
    cmd = [sys.executable, __file__, "--worker", "train", "--result", str(result), "--", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"variant {index} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return torch.load(result, weights_only=False)


def compare_states(reference: dict, other: dict) -> tuple[bool, int, float]:
    """(bitwise equal, tensors that differ, largest absolute difference over floating tensors)."""
    differing, largest = 0, 0.0
    for name, a in reference.items():
        b = other[name]
        if not torch.equal(a, b):
            differing += 1
            largest = max(largest, (a.double() - b.double()).abs().max().item())
    return differing == 0, differing, largest


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def pixel_difference(reference: np.ndarray, other: np.ndarray) -> str:
    diff = np.abs(reference.astype(np.int16) - other.astype(np.int16))
    if not diff.any():
        return "bitwise equal"
    images = int(diff.reshape(len(diff), -1).any(1).sum())
    return (f"{images} of {len(diff)} images differ; {100 * (diff > 0).mean():.3f} % of values, "
            f"largest difference {int(diff.max())}/255")


def data_checks(workdir: Path, decode_images: int) -> list[tuple[str, str]]:
    rows = []
    root, cache = data_root(), resolve_cache_dir(None)
    start = time.perf_counter()
    used = {s: load_cifar10_jpg(root, s, cache)[0] for s in ("train", "test")}  # builds it if absent
    tar_path = find_files(root)[0]
    built = [p for p in cache.glob("cifar10_jpg-*-train.npz")]
    when = (dt.datetime.fromtimestamp(max(p.stat().st_mtime for p in built), dt.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC") if built else "now")
    fresh_dir = workdir / "cache"
    fresh_dir.mkdir()
    fresh = {s: load_cifar10_jpg(root, s, fresh_dir)[0] for s in ("train", "test")}
    same = all(np.array_equal(used[s], fresh[s]) for s in used)
    rows.append((f"decoded cache built again from `{tar_path.name}` into an empty directory, against the "
                 f"cache the runs read (built {when})",
                 f"{'bitwise equal' if same else 'DIFFERENT'} (sha256 of the arrays: used "
                 f"{digest(used['train'], used['test'])}, rebuilt {digest(fresh['train'], fresh['test'])}; "
                 f"{time.perf_counter() - start:.0f} s)"))
    pil = used["train"][:decode_images]
    env = dict(os.environ, JSIMD_FORCENONE="1", PYTHONPATH=str(ROOT))
    out = workdir / "nosimd.npy"
    subprocess.run([sys.executable, __file__, "--worker", "decode", "--result", str(out), "--count",
                    str(decode_images)], env=env, check=True)
    rows.append((f"first {decode_images} training images: Pillow's libjpeg-turbo without SIMD "
                 f"(JSIMD_FORCENONE=1) against the cache", pixel_difference(pil, np.load(out))))
    from torchvision.io import ImageReadMode, decode_jpeg

    tv = np.stack([decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB).numpy()
                   for b in training_jpegs(decode_images)])
    import torchvision

    rows.append((f"first {decode_images} training images: torchvision {torchvision.__version__}'s own "
                 f"libjpeg (`torchvision.io.decode_jpeg`) against the cache", pixel_difference(pil, tv)))
    return rows


def render(args, runs: list[tuple[str, dict, list, dict]], data_rows: list, seconds: float) -> str:
    reference = runs[0][3]
    num = reference["numerics"]
    lines = ["# What changes the bits of a CPU training run (measured)", "",
             "Each row: the same short training run (ResNet-9 width 8, "
             f"{args.train} CIFAR-10 JPEG-copy training images, batch 32, {args.epochs} epochs = "
             f"{reference['steps']} SGD steps, seed 0; `{CONFIG.relative_to(ROOT)}` otherwise), in a fresh "
             "process with one factor changed; final weights (all parameters and buffers) against the "
             "reference run's, and test accuracy on 1,000 test images.", "",
             "| run | environment | bitwise equal to the reference | tensors that differ | "
             "largest weight difference | test acc % | minus reference (pts) |",
             "|---|---|---|---|---|---|---|"]
    for name, env, overrides, res in runs:
        equal, differing, largest = compare_states(reference["state"], res["state"])
        setting = ", ".join(f"`{k}={v}`" for k, v in {"OMP_NUM_THREADS": "1", **env}.items())
        setting += "".join(f", `{o}`" for o in overrides)
        lines.append(f"| {name} | {setting} | {'yes' if equal else 'no'} | {differing} of "
                     f"{len(res['state'])} | {largest:.3g} | {100 * res['acc']:.2f} | "
                     f"{100 * (res['acc'] - reference['acc']):+.2f} |")
    lines += ["", "Data (what the runs read):", "", "| check | result |", "|---|---|"]
    lines += [f"| {check} | {result} |" for check, result in data_rows]
    cpu = num["cpu"]
    lines += ["", "## Provenance", "",
              f"- command: `./run.sh python benchmarks/determinism.py --epochs {args.epochs} --train {args.train} "
              f"--decode-images {args.decode_images} --jobs {args.jobs}` ({seconds / 60:.1f} min, "
              "load average at start "
              f"{args.load_at_start:.2f} on {os.cpu_count()} cores: shared with other jobs, which "
              "changes timings only)",
              f"- machine: {machine_description()}",
              f"- CPU: {cpu['vendor']} \"{cpu['model_name']}\", family/model/stepping {cpu['family_model_stepping']}; "
              f"vector instruction sets: {' '.join(cpu['vector_isa'])}",
              f"- kernels: ATen capability {num['torch_cpu_capability']}; {'; '.join(num['onednn_mkl'])}",
              f"- torch {num['torch_build']}; {num['jpeg_decoder']}",
              f"- commit: `{args.commit}`",
              f"- date: {dt.date.today().isoformat()}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=2000, help="training images (class-balanced subset)")
    parser.add_argument("--decode-images", type=int, default=5000, help="JPEGs decoded by each other decoder")
    parser.add_argument("--variants", default=None,
                        help="comma-separated indices into the list of runs (0 is the reference; default all)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (each on its own threads)")
    parser.add_argument("--out", default=str(ROOT / "results" / "determinism_cpu.md"))
    parser.add_argument("--worker", choices=("train", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "train":
        train_worker(args.result, args.overrides)
        return 0
    if args.worker == "decode":
        decode_worker(args.result, args.count)
        return 0
    args.load_at_start, args.commit = os.getloadavg()[0], git_commit()  # the code that runs, not what follows
    chosen = [0, *sorted({int(i) for i in args.variants.split(",")} - {0})] if args.variants else range(len(VARIANTS))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        workdir = Path(tmp)
        # The runs go in their own processes, `--jobs` at a time; the data checks run here meanwhile.
        futures = [pool.submit(run_variant, VARIANTS[i][1], train_overrides(args) + VARIANTS[i][2], workdir, i)
                   for i in chosen]
        data_rows = data_checks(workdir, args.decode_images)
        for row in data_rows:
            print(" | ".join(row), flush=True)
        runs = []
        for i, future in zip(chosen, futures):
            name, env, overrides = VARIANTS[i]
            res = future.result()
            runs.append((name, env, overrides, res))
            equal, _, largest = compare_states(runs[0][3]["state"], res["state"])
            print(f"{name}: bitwise equal {equal}, largest difference {largest:.3g}, acc {100 * res['acc']:.2f} "
                  f"({res['seconds']:.0f} s)", flush=True)
    markdown = render(args, runs, data_rows, time.perf_counter() - start)
    Path(args.out).write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
