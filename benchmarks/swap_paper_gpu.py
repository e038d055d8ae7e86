"""Paper-scale SWAP on CIFAR-10 with ResNet-9 on ONE GPU: SB, LB and SWAP (8 in-process workers), with airbench94.

    python benchmarks/swap_paper_gpu.py --prepare     # here, before a device call: fills gpu_data/
    python benchmarks/swap_paper_gpu.py               # on the GPU machine (carry gpu_data); ~8 min budget
    python benchmarks/swap_paper_gpu.py --smoke       # CPU rehearsal of the same script (tests/test_gpu_script.py)

The three runs are the paper configs (configs/swap/cifar10_resnet9_{sb,lb,swap}_paper.yaml), each
launched through experiments/swap_cifar.py exactly as a user would, with these changes only:
- one process: SB's global batch 8 x 64 = 512 is one batch of 512 (BN statistics over 512
  images, not 8 x 64), LB's 8 x 128 = 1024 one batch of 1024; SWAP keeps its 8 replicas and 8
  workers as 8 in-process models (swa_lib.inprocess), so its BN statistics stay per replica;
- data: the JPEG copy of CIFAR-10 (data.dataset=cifar10_jpg, carried in gpu_data/, decoded on
  the machine), the whole uint8 set on the GPU (data.on_device), run.device=cuda;
- precision: fp32 as the configs say. PyTorch's default lets cuDNN run fp32 convolutions in
  TF32 on this GPU; the table says so. torch.compile is not used (the loop does not wire it yet).

airbench94 (PyPI `airbench` 0.1.8, carried as its sdist) runs beside them as the speed anchor:
one untimed warm-up run, then one timed run, on the same decoded JPEG copy (written in the
`cifar10/{train,test}.pt` layout airbench reads).

Budget: every run gets what is left of `--budget-s` (default 450 s, under the device's
10-minute limit per command). A run still going at the deadline receives SIGTERM, checkpoints
at the next step (swa_lib.preemption) and exits 75; the table marks it "incomplete", and the
same command run again on the same machine (run directories under --run-root survive while it
is warm) resumes it where it stopped. Finished runs are not rerun. Exit: 0 when every row is
done, 75 when some run is incomplete, 1 when one failed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swa_lib.preemption import PREEMPTED_EXIT_CODE  # noqa: E402
from swa_lib.run_log import git_commit, machine_description  # noqa: E402

AIRBENCH = "airbench-0.1.8.tar.gz"
CIFAR_FILES = ("cifar10_jpg.tar.xz", "cifar10_jpg_index.csv.gz")
RUNS = {  # label: (config, overrides beyond the common ones)
    "SB": ("configs/swap/cifar10_resnet9_sb_paper.yaml", ["optim.batch_size=512"]),
    "LB": ("configs/swap/cifar10_resnet9_lb_paper.yaml", ["optim.batch_size=1024"]),
    "SWAP": ("configs/swap/cifar10_resnet9_swap_paper.yaml", ["method.workers_in_process=8"]),
}
# --smoke: the same three runs and the same layout (8 in-process workers) on a CPU-sized problem.
SMOKE = ["data.train_subset=512", "data.test_subset=200", "model.kwargs={width: 4}", "schedule.epochs=3",
         "schedule.warmup_epochs=1", "eval.batch_size=200", "eval.bn_update_batches=2", "run.channels_last=false"]
SMOKE_RUNS = {"SB": ["optim.batch_size=64"], "LB": ["optim.batch_size=128"],
              "SWAP": ["optim.batch_size=16", "method.phase2_epochs=1", "method.phase2_batch_size=64"]}


def prepare(data_dir: Path) -> int:
    """Copy what the GPU machine cannot fetch into data_dir (git-ignored; name it in `carry`)."""
    source = ROOT.parent / "shared" / "data" / "cifar10"
    (data_dir / "cifar10").mkdir(parents=True, exist_ok=True)
    for name in CIFAR_FILES:
        shutil.copy2(source / name, data_dir / "cifar10" / name)
    if not (data_dir / AIRBENCH).is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", str(data_dir), "airbench==0.1.8"], check=True)
    size = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    print(f"prepared {data_dir} ({size / 2**20:.1f} MiB): carry it with the device call")
    return 0


def run_one(label: str, args, deadline: float, log_dir: Path) -> dict:
    """Train one row through the entry point until done or the deadline; its state and summary."""
    config, extra = RUNS[label]
    run_dir = args.run_root / label
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return {"state": "done (earlier call)", "summary": json.loads(summary_path.read_text())}
    remaining = deadline - time.monotonic()
    if remaining < 30:
        return {"state": "not started (budget spent)"}
    common = [f"data.root={args.data_root}", "data.dataset=cifar10_jpg", "run.progress=false",
              f"run.seed={args.seed}"]
    gpu = ["run.device=cuda", "data.on_device=true"]
    device = ["run.device=cpu", *SMOKE, *SMOKE_RUNS[label]] if args.smoke else gpu
    cmd = [sys.executable, str(ROOT / "experiments/swap_cifar.py"), "--config", str(ROOT / config),
           "--run-dir", str(run_dir), *common, *extra, *device]  # later overrides win
    log = log_dir / f"{label}.log"
    print(f"{label}: {' '.join(cmd)} ({remaining:.0f} s left)", flush=True)
    start = time.monotonic()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            code = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # checkpoint at the next step, exit 75 (swa_lib.preemption)
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    took = time.monotonic() - start
    tail = log.read_text()[-1500:]
    if code == 0 and summary_path.is_file():
        return {"state": "done", "summary": json.loads(summary_path.read_text()), "call_s": took}
    if code == PREEMPTED_EXIT_CODE:
        return {"state": "incomplete (checkpointed; run the command again)", "call_s": took}
    return {"state": f"failed (exit {code})", "log_tail": tail, "call_s": took}


def airbench_worker(data_dir: Path, work: Path) -> int:
    """In a child process: airbench94 on the decoded JPEG copy; prints one JSON line of results."""
    import torch

    from data.cifar10_jpg import load_cifar10_jpg

    with tarfile.open(data_dir / AIRBENCH) as tar:
        tar.extractall(work, filter="data")
    sys.path.insert(0, str(work / AIRBENCH.removesuffix(".tar.gz")))
    import airbench

    (work / "cifar10").mkdir(exist_ok=True)
    for split in ("train", "test"):
        images, labels, classes = load_cifar10_jpg(data_dir, split, work / "cache")
        torch.save({"images": torch.from_numpy(images).permute(0, 2, 3, 1).contiguous(),
                    "labels": torch.from_numpy(labels), "classes": list(classes)}, work / "cifar10" / f"{split}.pt")
    os.chdir(work)  # airbench reads ./cifar10/{train,test}.pt
    airbench.warmup94(verbose=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = airbench.train94(verbose=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    print(json.dumps({"train_s": seconds, "acc": airbench.evaluate(model, test, tta_level=0),
                      "acc_tta": airbench.evaluate(model, test, tta_level=2)}))
    return 0


def run_airbench(args, deadline: float) -> dict:
    if args.smoke:
        return {"state": "skipped (CPU rehearsal: airbench needs CUDA)"}
    if not (args.data_root / AIRBENCH).is_file():
        return {"state": f"skipped ({args.data_root / AIRBENCH} missing: run --prepare and carry it)"}
    remaining = deadline - time.monotonic()
    if remaining < 30:
        return {"state": "not started (budget spent)"}
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, __file__, "--airbench-worker", "--data-root", str(args.data_root), "--work", work]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"state": "incomplete (budget spent)"}
    if proc.returncode != 0:
        return {"state": f"failed (exit {proc.returncode})", "log_tail": (proc.stdout + proc.stderr)[-1500:]}
    return {"state": "done", "airbench": json.loads(proc.stdout.strip().splitlines()[-1])}


def table_rows(results: dict, smoke: bool) -> list[str]:
    rows = ["| run | layout | test acc % | epochs | critical-path steps | train s (measured) | "
            "train s (modelled, 8 GPUs) | state |", "|---|---|---|---|---|---|---|---|"]
    layout = {"SB": "1 model, batch 512", "LB": "1 model, batch 1024",
              "SWAP": "8 in-process replicas (phase 1, 8 x 128), then 8 workers (batch 512 each)"}
    if smoke:
        layout = {"SB": "1 model, batch 64", "LB": "1 model, batch 128",
                  "SWAP": "8 in-process replicas (8 x 16), then 8 workers (batch 64 each)"}
    for label in RUNS:
        r = results[label]
        s = r.get("summary")
        if s is None:
            rows.append(f"| {label} | {layout[label]} | - | - | - | - | - | {r['state']} |")
            continue
        final = s["final"]
        train = final.get("time/train", 0.0)
        modelled = train
        if label == "SWAP":  # phase 2's 8 workers ran one after another here; on 8 GPUs side by side
            modelled = train - final.get("time/phase/phase2", 0.0) * (1 - 1 / 8)
        rows.append(f"| {label} | {layout[label]} | {100 * final['output/acc']:.2f} | {s['epochs']} | "
                    f"{s['steps']} | {train:.0f} | {modelled:.0f} | {r['state']} |")
    a = results["airbench94"]
    if "airbench" in a:
        ab = a["airbench"]
        rows.append(f"| airbench94 | its own net and schedule | {100 * ab['acc']:.2f} (TTA {100 * ab['acc_tta']:.2f}) "
                    f"| - | - | {ab['train_s']:.1f} | - | done |")
    else:
        rows.append(f"| airbench94 | its own net and schedule | - | - | - | - | - | {a['state']} |")
    return rows


def swap_details(results: dict, run_root: Path) -> list[str]:
    s = results["SWAP"].get("summary")
    if s is None:
        return []
    final = s["final"]
    phases = ", ".join(f"{p} {final[f'time/phase/{p}']:.0f} s" for p in ("phase1", "phase2", "phase3")
                       if f"time/phase/{p}" in final)
    end = ""
    for line in (run_root / "SWAP" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "swap/phase1_end_epoch" in record:
            rule = "95 % training accuracy" if record["swap/phase1_stopped_by_accuracy"] else "its epoch cap"
            end = (f" Phase 1 ended after epoch {record['swap/phase1_end_epoch']} at {rule} (training "
                   f"accuracy {record['swap/phase1_end_train_acc']:.2f} %).")
    return [f"- SWAP phases (measured): {phases}.{end} The modelled column divides phase 2 by 8 (the "
            f"workers of the paper's 8 GPUs run side by side); phases 1 and 3 are as measured."]


def write_table(out: Path, results: dict, args, started: str, elapsed: float) -> None:
    import torch

    device = torch.cuda.get_device_name(0) if (torch.cuda.is_available() and not args.smoke) else "CPU"
    tf32 = torch.backends.cudnn.allow_tf32 if device != "CPU" else False
    lines = [
        "# SWAP at paper scale on one GPU: CIFAR-10, ResNet-9 (SB, LB, SWAP with 8 in-process workers)" +
        (" - CPU REHEARSAL, not a result" if args.smoke else ""), "",
        f"- Date: {started}; this call took {elapsed:.0f} s of a {args.budget_s:.0f} s budget",
        f"- Device: {device}; host: {machine_description()}",
        f"- torch {torch.__version__}; fp32 weights and optimizer; cuDNN TF32 convolutions allowed: {tf32}",
        f"- Git commit: {git_commit()}",
        f"- Command: `python benchmarks/swap_paper_gpu.py {' '.join(sys.argv[1:])}` (see its docstring for what "
        f"differs from the 8-process paper layout)",
        f"- Seed {args.seed}, one run per row: no spread is claimed.", "",
        *table_rows(results, args.smoke), "",
        "- Critical-path steps: optimizer steps in sequence; SWAP's in-process workers step together, so a "
        "loop step counts once.",
        *swap_details(results, args.run_root),
    ]
    for label, r in results.items():
        if "log_tail" in r:
            lines += ["", f"{label} failed; the end of its log:", "```", r["log_tail"].strip(), "```"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU rehearsal on a tiny subset and a narrow model")
    parser.add_argument("--prepare", action="store_true", help="copy the data and airbench into --data-root, then exit")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds this call may train (default 450)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "gpu_data")
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "swap_paper_gpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="the table (default results/swap_cifar10_paper_gpu.md; --smoke: under --run-root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=[*RUNS, "airbench94"], default=None)
    parser.add_argument("--airbench-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data_root, args.run_root = args.data_root.resolve(), args.run_root.resolve()
    if args.airbench_worker:
        return airbench_worker(args.data_root, args.work)
    if args.prepare:
        return prepare(args.data_root)
    if args.smoke and args.data_root == (ROOT / "gpu_data").resolve() and not args.data_root.exists():
        args.data_root = ROOT.parent / "shared" / "data"
    out = args.out or (args.run_root / "table.md" if args.smoke else ROOT / "results" / "swap_cifar10_paper_gpu.md")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    args.run_root.mkdir(parents=True, exist_ok=True)
    wanted = args.only or [*RUNS, "airbench94"]
    results = {}
    for label in RUNS:
        results[label] = run_one(label, args, deadline, args.run_root) if label in wanted else {"state": "not asked"}
    results["airbench94"] = run_airbench(args, deadline) if "airbench94" in wanted else {"state": "not asked"}
    write_table(out, results, args, started, time.monotonic() - t0)
    states = [r["state"] for label, r in results.items() if label in wanted]
    if any(s.startswith("failed") for s in states):
        return 1
    return 0 if all(s.startswith(("done", "skipped")) for s in states) else PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
