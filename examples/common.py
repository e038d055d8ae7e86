"""What the examples share and a user's own code would bring: a small real data subset, a
small model, sharded batches and an accuracy. Nothing here is part of swa_lib.

The examples are API demonstrations on a few hundred real CIFAR-10 images for a few
epochs. Their accuracies show that each method runs end to end, not how well it works;
the reproduction tables in results/ are made by experiments/ on the full data.

`--data-root` is any of:
  - the CIFAR-10 JPEG archive `cifar10_jpg.tar.xz` (train/<class>/NNNN.jpg, test/<class>/...),
    or a folder holding it (directly or under cifar10/);
  - a folder with train/ and test/ subfolders of class folders;
  - a folder of class folders (one split: the test images are taken from it too, disjoint).
Images are read with PIL and torchvision only.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

ARCHIVE = "cifar10_jpg.tar.xz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 channel statistics
DEMO_NOTE = "API demo on a small real subset: the accuracies show that it runs, not how well the method works"


def parse_args(description: str, epochs: int = 3, extra: dict | None = None, **defaults) -> argparse.Namespace:
    """The shared options, plus `extra` ({"--flag": default}, typed by the default)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (extra or {}).items():
        parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--data-root", default=os.environ.get("SWA_DATA_ROOT"),
                        help=f"{ARCHIVE}, a folder holding it, or a folder of class folders "
                             f"(default: env SWA_DATA_ROOT)")
    parser.add_argument("--train-per-class", type=int, default=defaults.get("train_per_class", 64))
    parser.add_argument("--test-per-class", type=int, default=defaults.get("test_per_class", 50))
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32), help="per process")
    parser.add_argument("--lr", type=float, default=defaults.get("lr", 0.05))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data_root:
        parser.error(f"--data-root is required (or set SWA_DATA_ROOT): the path of {ARCHIVE} "
                     f"or of a folder of class folders")
    return args


def _find_archive(root: Path) -> Path | None:
    if root.is_file():
        return root
    for candidate in (root / ARCHIVE, root / "cifar10" / ARCHIVE):
        if candidate.is_file():
            return candidate
    return None


def _from_archive(path: Path, per_class: dict[str, int]) -> dict[str, list]:
    """The first per_class[split] images of each class, streamed from the tar (it is read once)."""
    out: dict[str, dict[str, list]] = {split: {} for split in per_class}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            split, label, _ = parts
            images = out[split].setdefault(label, [])
            if len(images) < per_class[split]:
                images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    return {split: [(img, label) for label in sorted(classes) for img in classes[label]]
            for split, classes in out.items()}


def _from_folders(root: Path, per_class: dict[str, int]) -> dict[str, list]:
    if all((root / split).is_dir() for split in per_class):
        sources = {split: (ImageFolder(str(root / split)), 0) for split in per_class}
    else:  # one folder of classes: train takes the first images of each class, test the next ones
        folder = ImageFolder(str(root))
        sources = {"train": (folder, 0), "test": (folder, per_class["train"])}
    out = {}
    for split, (folder, skip) in sources.items():
        seen: dict[int, int] = {}
        pairs = []
        for path, target in folder.samples:
            seen[target] = seen.get(target, 0) + 1
            if skip < seen[target] <= skip + per_class[split]:
                pairs.append((Image.open(path).convert("RGB"), folder.classes[target]))
        out[split] = pairs
    return out


def load_subset(data_root: str, train_per_class: int, test_per_class: int,
                size: int = 32) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) TensorDatasets of normalized size x size images and integer labels."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise SystemExit(f"error: --data-root {root} does not exist")
    per_class = {"train": train_per_class, "test": test_per_class}
    archive = _find_archive(root)
    splits = _from_archive(archive, per_class) if archive else _from_folders(root, per_class)
    classes = sorted({label for _, label in splits["train"]})
    if not splits["train"] or not splits["test"]:
        raise SystemExit(f"error: no images found under {root}; expected {ARCHIVE} or class folders")
    out = []
    for split in ("train", "test"):
        images = torch.stack([TF.normalize(TF.to_tensor(TF.resize(img, [size, size])), MEAN, STD)
                              for img, _ in splits[split]])
        labels = torch.tensor([classes.index(label) for _, label in splits[split]])
        out.append(TensorDataset(images, labels))
    return out[0], out[1]


def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Three conv + batch-norm blocks and a linear head: seconds per epoch on a CPU."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def shard_loader(dataset, rank: int, count: int, batch_size: int, seed: int) -> DataLoader:
    """Shard `rank` of `count` in a shuffled order from `seed`; call .sampler.set_epoch(e) each epoch.
    Every shard gets the same number of full batches (needed by exact BN recompute over ranks)."""
    sampler = DistributedSampler(dataset, num_replicas=count, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)


@torch.no_grad()
def accuracy(model: nn.Module, dataset) -> float:
    model.eval()
    images, labels = dataset.tensors
    correct = (model(images).argmax(1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def train_epoch(model, optimizer, loader, epoch: int, after_backward=None, after_step=None, step: int = 0) -> int:
    """One epoch of cross-entropy SGD; hooks for gradient averaging and per-step averaging.
    Returns the number of optimizer steps taken so far."""
    loader.sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        step += 1
        if after_step is not None:
            after_step(step)
    return step
