"""ArrayDataset (a whole dataset in memory as uint8) and load_dataset, the one entry point."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from data.cache import resolve_cache_dir
from data.cifar import load_cifar_pickle
from data.cifar10_jpg import load_cifar10_jpg
from data.tiny_imagenet import load_tiny_imagenet

DATASET_NAMES = ("cifar10", "cifar10_jpg", "cifar100", "tiny_imagenet")
SPLITS = ("train", "test")

# Per-channel mean and std of the training pixels in [0, 1] units.
# CIFAR-10: computed over the 50,000 official training images (population std, not the
# per-image-averaged 0.2023/0.1994/0.2010 that circulates); the JPEG copy gives the same values
# to within 0.003 (tests/test_data.py checks this). CIFAR-100: computed the same way over its
# training set, the values used e.g. by weiaicunzai/pytorch-cifar100. ImageNet: torchvision's
# reference training scripts and model documentation; used for Tiny-ImageNet too, as usual.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar10_jpg": (CIFAR10_MEAN, CIFAR10_STD),
         "cifar100": (CIFAR100_MEAN, CIFAR100_STD), "tiny_imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


@dataclass
class ArrayDataset:
    """A whole dataset held in memory.

    images: uint8 N x C x H x W. labels: int64 N. mean, std: per channel in [0, 1] units, for
    normalisation. class_names: label -> name (wnids for Tiny-ImageNet).
    """
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images are {self.images.dtype} {tuple(self.images.shape)}, "
                             f"expected uint8 N x C x H x W")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"{self.name}: labels are {self.labels.dtype} {tuple(self.labels.shape)}, "
                             f"expected int64 of length {len(self.images)}")
        if not len(self.mean) == len(self.std) == self.images.shape[1]:
            raise ValueError(f"{self.name}: mean/std have {len(self.mean)}/{len(self.std)} entries for "
                             f"{self.images.shape[1]} channels")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> ArrayDataset:
        """The same dataset with images and labels on `device` (one copy, shareable by loaders)."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def class_balanced_order(labels: np.ndarray) -> np.ndarray:
    """Indices ordered round-robin over classes: every class's 1st example, then every 2nd, ...

    Any prefix of this order is class-balanced (counts differ by at most one while each class
    still has examples), and within a class the dataset's own order is kept.
    """
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.arange(len(labels)) - class_start
    return order[np.lexsort((sorted_labels, rank_in_class))]


def load_dataset(name: str, root: str | Path, split: str, cache_dir: str | Path | None = None,
                 subset: int | None = None, num_classes: int | None = None,
                 download: bool | None = None) -> ArrayDataset:
    """Load one split of a dataset into memory.

    Args:
        name: "cifar10", "cifar100" (official torchvision pickles under root), "cifar10_jpg"
            (<root>/cifar10/cifar10_jpg.tar.xz + index csv) or "tiny_imagenet" (the archive
            under <root>/tiny-imagenet/, or an extracted folder with train/ and val/).
        root: data root.
        split: "train" or "test" (Tiny-ImageNet's "test" is its official validation set).
        cache_dir: where decoded arrays are cached; None: env SWA_DATA_CACHE, else
            ~/.cache/swa_lib/data.
        subset: keep this many examples, the first of a class-balanced round-robin order
            (deterministic), returned in the dataset's own order.
        num_classes: keep only labels 0..K-1 (for Tiny-ImageNet the first K sorted wnids, and
            only those are decoded).
        download: CIFAR pickles only; see data.cifar.load_cifar_pickle.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset name {name!r}, expected one of {DATASET_NAMES} "
                         f"(full ImageNet streams from class folders: build_image_folder_loader)")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}, expected one of {SPLITS}")
    for arg, value in (("subset", subset), ("num_classes", num_classes)):
        if value is not None and value < 1:
            raise ValueError(f"{arg}={value}, expected a positive integer or None")
    root = Path(root).expanduser()
    if name in ("cifar10", "cifar100"):
        images, labels, class_names = load_cifar_pickle(root, name, split, download)
    elif name == "cifar10_jpg":
        images, labels, class_names = load_cifar10_jpg(root, split, resolve_cache_dir(cache_dir))
    else:
        images, labels, class_names = load_tiny_imagenet(root, split, resolve_cache_dir(cache_dir), num_classes)

    total_classes = len(class_names)
    if num_classes is not None:
        if num_classes > total_classes:
            raise ValueError(f"num_classes={num_classes}, but {name} has {total_classes} classes")
        keep = labels < num_classes
        images, labels, class_names = images[keep], labels[keep], class_names[:num_classes]
    if subset is not None:
        if subset > len(labels):
            raise ValueError(f"subset={subset}, but {name} {split} has only {len(labels)} examples")
        chosen = np.sort(class_balanced_order(labels)[:subset])
        images, labels = images[chosen], labels[chosen]
    mean, std = STATS[name]
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                        len(class_names), mean, std, name, tuple(class_names))


def holdout_split(dataset: ArrayDataset, count: int, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Carve a class-balanced validation set of `count` examples out of a training set.

    The held-out examples are the first `count` of a class-balanced round-robin order over a
    random permutation drawn from `seed`, so they are spread over the whole set rather than
    taken from its start. Returns (rest, held_out), each in the dataset's own order; together
    they are the input exactly once. Tune on the held-out part, never on the test split.
    """
    if not 0 < count < len(dataset):
        raise ValueError(f"validation split of {count} examples: must be in [1, {len(dataset) - 1}] "
                         f"for a training set of {len(dataset)}")
    perm = np.random.default_rng(seed).permutation(len(dataset))
    held = np.zeros(len(dataset), dtype=bool)
    held[perm[class_balanced_order(dataset.labels.numpy()[perm])[:count]]] = True
    keep = torch.from_numpy(~held)
    held_t = torch.from_numpy(held)
    return (replace(dataset, images=dataset.images[keep], labels=dataset.labels[keep]),
            replace(dataset, images=dataset.images[held_t], labels=dataset.labels[held_t]))


def resize_images(dataset: ArrayDataset, size: int) -> ArrayDataset:
    """The dataset with every image resized to size x size, once, in memory.

    Downsampling uses area averaging (a box filter), the filter of the downsampled-ImageNet
    variants of Chrabaszcz et al. (2017); upsampling uses bilinear interpolation. Values are
    rounded back to uint8. Done in chunks so a 100,000-image set needs little extra memory.
    """
    if size < 1:
        raise ValueError(f"image size {size}: must be a positive number of pixels")
    h, w = dataset.images.shape[-2:]
    if (h, w) == (size, size):
        return dataset
    mode = "area" if size <= min(h, w) else "bilinear"
    out = torch.empty((len(dataset), dataset.images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(dataset), 4096):
        chunk = dataset.images[start:start + 4096].float()
        kwargs = {} if mode == "area" else {"align_corners": False}
        resized = torch.nn.functional.interpolate(chunk, size=(size, size), mode=mode, **kwargs)
        out[start:start + 4096] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return replace(dataset, images=out)
