"""A workload owns the data, the model and the loss (as in AlgoPerf); the loop owns the rest.

This is the reproduction harness's one bridge to the checkout's top-level `data/` and
`models/` packages: the Trainer gets its workload from here, and nothing else in swa_lib
imports those packages (tests/test_packaging.py checks it). A user's own loop brings its
own data and model and never imports this module; it works only from a checkout (the entry
points under experiments/ put the repository root on sys.path).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

try:
    import data as datasets
    import models
except ImportError as err:  # an installed swa_lib used outside the checkout
    raise ImportError(f"swa_lib.workload is the reproduction harness and needs the repository's "
                      f"data/ and models/ packages on sys.path ({err}); run the entry points under "
                      f"experiments/ from a checkout, or drive swa_lib from your own loop "
                      f"(see examples/)") from err
from swa_lib.config import Config
from swa_lib.methods.base import DataShard

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_MEMORY = {"cifar10", "cifar10_jpg", "cifar100", "tiny_imagenet"}


def model_names() -> list[str]:
    """The names `model.name` may take: the harness's model registry (for load_config)."""
    return models.available_models()


def resolve_dataset(name: str, root: Path) -> str:
    """The dataset to load for `name`: the CIFAR-10 JPEG copy falls back to the official files.

    A newcomer's clone often lacks ../shared/data. For `cifar10_jpg` without the JPEG copy under
    `root`, the official CIFAR-10 python files (torchvision's cifar-10-batches-py) under the
    same root are used instead, with a note; with SWA_DATA_DOWNLOAD=1 (the consent to go on
    the internet) they are downloaded there. Without either, a FileNotFoundError says where
    each was looked for and how to provide one. Other datasets are returned unchanged."""
    from data.cifar import DOWNLOAD_ENV, LAYOUTS
    from data.cifar10_jpg import find_files

    if name != "cifar10_jpg":
        return name
    try:
        find_files(root)
        return name
    except FileNotFoundError as err:
        missing_jpg = str(err)
    official = [root / LAYOUTS["cifar10"].folder, root / "cifar10" / LAYOUTS["cifar10"].folder]
    found = next((f for f in official if (f / LAYOUTS["cifar10"].meta_file).is_file()), None)
    consent = os.environ.get(DOWNLOAD_ENV, "") == "1"
    if found is None and not consent:
        raise FileNotFoundError(
            f"no CIFAR-10 found under the data root {root}. {missing_jpg}. Nor are the official "
            f"CIFAR-10 python files there ({official[0]} or {official[1]}, torchvision's format). "
            f"Either put the JPEG copy or the official files under a folder and set SWA_DATA_ROOT "
            f"to it, or set {DOWNLOAD_ENV}=1 to let torchvision download the official files into {root}")
    how = f"found in {found}" if found else f"downloading them into {root} ({DOWNLOAD_ENV}=1)"
    print(f"note: data.dataset cifar10_jpg: the JPEG copy is not under {root}; using the official "
          f"CIFAR-10 files instead ({how}). Accuracies differ a little from the tables in results/, "
          f"which used the JPEG copy", file=sys.stderr, flush=True)
    return "cifar10"


def data_root(cfg: Config) -> Path:
    """SWA_DATA_ROOT if set, else data.root (relative paths from the repo root)."""
    root = Path(os.environ.get("SWA_DATA_ROOT") or cfg.data.root).expanduser()
    return root if root.is_absolute() else (REPO_ROOT / root).resolve()


class Workload:
    """Datasets, loaders and the model of one config, on one device."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.root = data_root(cfg)
        d = cfg.data
        self._loaders: dict = {}
        self.dataset = resolve_dataset(d.dataset, self.root)  # what is loaded (see resolve_dataset)
        if d.dataset in IN_MEMORY:
            cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else None  # None: env, else the default
            kw = dict(root=self.root, cache_dir=cache_dir, num_classes=d.num_classes)
            self.train_set = datasets.load_dataset(self.dataset, split="train", subset=d.train_subset, **kw)
            if d.val_split:  # tuning: train on the rest, "test" metrics are on the held-out images
                self.train_set, self.test_set = datasets.holdout_split(self.train_set, d.val_split)
            else:
                self.test_set = datasets.load_dataset(self.dataset, split="test", subset=d.test_subset, **kw)
            if d.image_size:
                self.train_set = datasets.resize_images(self.train_set, d.image_size)
                self.test_set = datasets.resize_images(self.test_set, d.image_size)
            self.num_classes = self.train_set.num_classes
            self.num_train = len(self.train_set.labels)
            self.num_eval = len(self.test_set.labels)
        else:  # imagenet: class folders streamed from disk
            self.train_set = self.test_set = None
            self.num_classes = d.num_classes or 1000
            self.num_train = self.num_eval = None
        self.eval_split = "val" if d.val_split else "test"  # what the eval/ metrics were measured on
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    def build_model(self) -> nn.Module:
        model = models.build_model(self.cfg.model.name, self.num_classes, **self.cfg.model.kwargs)
        model = model.to(self.device)
        if self.cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def train_loader(self, shard: DataShard):
        """Training batches of `shard`; cached, so a phase switch costs nothing the second time."""
        key = ("train", shard)
        if key not in self._loaders:
            self._loaders[key] = self._make(train=True, rank=shard.rank, count=shard.count,
                                            seed=shard.seed, batch_size=shard.batch_size)
        return self._loaders[key]

    def test_loader(self, rank: int, count: int):
        key = ("test", rank, count)
        if key not in self._loaders:
            self._loaders[key] = self._make(train=False, rank=rank, count=count, seed=0,
                                            batch_size=self.cfg.eval.batch_size)
        return self._loaders[key]

    def _make(self, *, train, rank, count, seed, batch_size):
        d = self.cfg.data
        if d.dataset in IN_MEMORY:
            loader_device = self.device if d.on_device else "cpu"
            return datasets.ShardedLoader(
                self.train_set if train else self.test_set, batch_size, train=train,
                augment=(None if d.augment == "none" else d.augment) if train else None,
                shard_rank=rank, shard_count=count, seed=seed, device=loader_device,
                channels_last=self.cfg.run.channels_last)
        return datasets.build_image_folder_loader(
            self.root / "imagenet", "train" if train else "val", batch_size, train=train,
            shard_rank=rank, shard_count=count, seed=seed, num_workers=d.num_workers)
