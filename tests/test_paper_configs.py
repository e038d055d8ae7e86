"""Every paper-scale config starts: two optimizer steps of each on CPU, on a tiny real subset.

A wrong key, shape or data path in a paper config would otherwise surface only after a user
has paid for GPU time. Each config runs with its own model and method; the overrides only
shorten the schedule (2 epochs of one step each, methods' start epochs and periods scaled to
fit; LAWA 10 steps an epoch so that its queue of 20 fills), pick a few real images, and
shrink the per-process batch to a few images (8; 4 for ResNet-18, 2 for WRN-28-10, 1 for
ResNet-50) so that the file fits in CI.

Data: the paper configs name the official CIFAR-10 pickles, which are not on this machine;
they run on the real CIFAR-10 JPEG copy instead (same images, lossy). CIFAR-100 has no real
copy here at all: those configs read real CIFAR-10 images written in the official CIFAR-100
pickle format, labels spread over the 100 classes, so the CIFAR-100 loader, the 100-class head
and the method all run (the accuracy means nothing). ResNet-50 reads 16 of the full-size images
of ../shared/data/imagenet-sample through the ImageNet class-folder pipeline; Tiny-ImageNet one
real image per class (all 200 classes) from the official archive.

SWAP's 8 workers and HWA's 4 groups run as 2 processes under mpirun, each holding 4 or 2 of the
models in-process (swa_lib.inprocess): the composition a user with 2 GPUs would run, and what
keeps 8 ranks of ResNet-50 from sharing 2 CI cores. Data and steps are those of the full world.
"""
from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import data
from mpi_util import MPIRUN, PYTHON, REPO_ROOT
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config
from test_data import DATA_ROOT, TINY_TAR, write_fake_cifar

PAPER_CONFIGS = sorted((REPO_ROOT / "configs").glob("*/*_paper.yaml"))
# Per-process batch: a paper batch of 128 takes minutes per step on 2 shared CPU cores.
BATCH = 8
HEAVY_BATCH = {"resnet18": 4, "wrn28_10": 2, "resnet50": 1}  # BN in training mode still sees >= 7 x 7 values
ENTRY = {"swap": "swap_cifar.py", "hwa": "hwa_cifar.py"}
PROCESSES = 2  # SWAP's workers and HWA's groups: world / 2 models in each of 2 processes


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    """Real CIFAR-10 pixels in the official CIFAR-100 pickle layout (no CIFAR-100 copy exists here)."""
    root = tmp_path_factory.mktemp("cifar100")
    images, labels = {}, {}
    for split, count in (("train", 600), ("test", 100)):
        ds = data.load_dataset("cifar10_jpg", DATA_ROOT, split, subset=count)
        images[split] = ds.images.numpy()
        labels[split] = np.arange(count) % 100  # every class present, so class-balanced subsets work
    write_fake_cifar(root, "cifar100", images, labels)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """<root>/imagenet/{train,val}/<wnid>/*.JPEG: 8 of the real full-size sample images (one class each).

    8 = the 8 workers' global batch of 1 each: one phase-1 step, 8 steps per phase-2 worker."""
    root = tmp_path_factory.mktemp("imagenet_data")
    folder = root / "imagenet"
    with tarfile.open(DATA_ROOT / "imagenet-sample" / "imagenet-sample-100.tar") as archive:
        files = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in files[::13][:7] + [files[71]]:  # spread over the sample; 71 is its grayscale image
            name = Path(member.name).name
            (folder / "val" / name.split("_")[0]).mkdir(parents=True)
            (folder / "val" / name.split("_")[0] / name).write_bytes(archive.extractfile(member).read())
    (folder / "train").symlink_to(folder / "val")
    return root


@pytest.fixture(scope="module")
def tiny_imagenet_root(tmp_path_factory):
    """An extracted Tiny-ImageNet tree with the first two real training images of every class."""
    root = tmp_path_factory.mktemp("tiny_data")
    folder = root / "tiny-imagenet"
    seen: dict[str, int] = {}
    with tarfile.open(TINY_TAR, "r|xz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 5 or parts[1] != "train" or seen.get(parts[2], 0) >= 2:
                continue
            wnid, n = parts[2], seen.get(parts[2], 0)
            target = folder / ("train" if n == 0 else "val") / wnid / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            seen[wnid] = n + 1
            if len(seen) == 200 and min(seen.values()) == 2:
                break  # the rest of the archive need not be decompressed
    assert len(seen) == 200 and min(seen.values()) == 2
    return root


def short_run(raw: dict, world: int) -> list[str]:
    """Overrides for a 2-step run of a paper config: schedule, data subset and batch only."""
    d, m, s, o = raw["data"], raw["method"], raw["schedule"], raw["optim"]
    batch = min(o["batch_size"], HEAVY_BATCH.get(raw["model"]["name"], BATCH))
    out = [f"optim.batch_size={batch}", "schedule.epochs=2", "eval.every_epochs=1", "eval.every_steps=null",
           "eval.batch_size=20", "run.progress=false", "run.device=cpu", "data.num_workers=0"]
    if s.get("warmup_epochs"):
        out.append("schedule.warmup_epochs=0.5")
    if s.get("reference_epochs"):
        out.append("schedule.reference_epochs=1")
    images = batch * world  # one step per epoch
    if m["name"] in ("swa", "swalp") and m.get("swa_start_epoch"):
        out.append("method.swa_start_epoch=1")
    if m["name"] in ("lawa", "ema"):
        out.append("method.every_steps=1")
        if m["name"] == "lawa":  # its queue of `window` snapshots must fill before it is evaluated
            images *= -(-m["window"] // 2)
    if m["name"] == "hwa":
        out += ["method.sync_period_steps=1", "method.window_cycles=2"]
        images = batch * world // m["groups"]
    if m["name"] == "swap":
        phase2 = min(m["phase2_batch_size"], batch)
        out += ["method.phase2_epochs=1", f"method.phase2_batch_size={phase2}"]
    if d["dataset"] != "imagenet":  # in-memory sets; ImageNet folders hold only the sample
        out += [f"data.train_subset={images}", "data.test_subset=20"]
    if d["dataset"] == "cifar10":  # the official pickles are not here; the real JPEG copy is
        out.append("data.dataset=cifar10_jpg")
    return out


def world_size(raw: dict) -> int:
    m = raw["method"]
    return {"hwa": m.get("groups", 1), "swap": m.get("workers", 1)}.get(m["name"], 1)


@pytest.mark.timeout(900)  # generous: a shared CI machine may be loaded
@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_trains_two_steps_on_a_real_subset(path, tmp_path, request):
    raw = yaml.safe_load(path.read_text())
    world = world_size(raw)
    overrides = short_run(raw, world)
    dataset = raw["data"]["dataset"]
    if dataset in ("cifar100", "imagenet", "tiny_imagenet"):
        fixture = {"cifar100": "cifar100_root", "imagenet": "imagenet_root", "tiny_imagenet": "tiny_imagenet_root"}
        overrides.append(f"data.root={request.getfixturevalue(fixture[dataset])}")
        # A throwaway root's decoded arrays go to a throwaway cache, not to pile up in the user's (the
        # cache key holds the root's path); the real CIFAR-10 copy keeps the shared cache (minutes to decode).
        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    method = raw["method"]["name"]
    run_dir = tmp_path / "run"
    if world == 1:
        cfg = load_config(path, overrides)
        trainer = build_trainer(cfg, init_comm("single"), run_dir)
        summary = trainer.fit()
    else:
        entry = "swap_imagenet.py" if dataset == "imagenet" else ENTRY[method]
        cmd = [*MPIRUN, "-np", str(min(PROCESSES, world)), PYTHON, str(REPO_ROOT / "experiments" / entry),
               "--config", str(path), "--run-dir", str(run_dir), *overrides]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=840, cwd=REPO_ROOT)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] >= 2, summary  # LAWA: 20, SWAP: 1 + 8 per worker
    assert np.isfinite(summary["final"]["output/loss"])
    if dataset == "tiny_imagenet":  # (CIFAR-100's pickles are read as they are, not cached)
        assert list((tmp_path / "cache").glob(f"{dataset}-*.npz")), "its arrays were cached elsewhere"
    phases = [h["phase"] for h in summary["history"]]
    if method == "swap":  # phase 1 (1 epoch), phase 2 (1 epoch), phase 3 (the average)
        assert phases == ["phase2", "phase3"] and summary["output_name"] == "swap", phases
    if method == "hwa":  # a sync after each of the 2 steps; the window output exists from the first
        assert summary["steps"] == 2 and summary["output_name"] == "hwa", summary
        assert "hwa" in summary["history"][0]["results"], summary["history"][0]
    if method in ("swa", "swalp") and raw["method"].get("average", True):
        assert "swa" in summary["history"][-1]["results"], summary["history"][-1]
    if method in ("lawa", "ema"):
        assert summary["output_name"] == method and method in summary["history"][-1]["results"], summary
