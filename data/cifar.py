"""CIFAR-10 / CIFAR-100 in the official torchvision pickle format (cifar-10-batches-py, cifar-100-python).

The official files are Python-2 pickles of dicts: 'data' is an N x 3072 uint8 array whose rows
hold the 1024 red, then green, then blue values of a 32x32 image in row-major order, so a
reshape to N x 3 x 32 x 32 is already NCHW. Labels are 'labels' (CIFAR-10) or 'fine_labels'
(CIFAR-100); class names are in 'batches.meta' / 'meta'.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.archive import DatasetError

DOWNLOAD_ENV = "SWA_DATA_DOWNLOAD"


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), "batches.meta", "labels", "label_names", 10),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), "meta",
                            "fine_labels", "fine_label_names", 100),
}


def _read_pickle(path: Path) -> dict:
    # The official format is a pickle, as torchvision reads it too: only load files you trust.
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({err})") from err
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    # Files written by Python 3 with bytes keys load with bytes keys; the official ones with str.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _find_folder(root: Path, name: str, layout: CifarLayout) -> Path | None:
    # torchvision's layout (root/cifar-10-batches-py), or one level down as in ../shared/data.
    for candidate in (root / layout.folder, root / name / layout.folder):
        if (candidate / layout.meta_file).is_file():
            return candidate
    return None


def _download(root: Path, name: str) -> None:
    import torchvision  # only needed where the internet is reachable

    dataset_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    for train in (True, False):
        dataset_cls(str(root), train=train, download=True)


def load_cifar_pickle(root: Path, name: str, split: str, download: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images (N x 3 x 32 x 32 uint8), labels (int64) and class names of one CIFAR split.

    Args:
        root: the folder holding cifar-10-batches-py / cifar-100-python (torchvision's `root`).
        name: "cifar10" or "cifar100".
        split: "train" or "test".
        download: fetch the official files with torchvision when absent; None reads env
            SWA_DATA_DOWNLOAD ("1" allows it). Off by default: machines here have no internet.
    """
    layout = LAYOUTS[name]
    folder = _find_folder(root, name, layout)
    if folder is None:
        if download is None:
            download = os.environ.get(DOWNLOAD_ENV, "") == "1"
        expected = root / layout.folder
        if not download:
            raise FileNotFoundError(
                f"{name}: {expected / layout.meta_file} is missing. Expected the official "
                f"torchvision pickle files {list(layout.train_files + layout.test_files)} and "
                f"'{layout.meta_file}' in {expected}. Without internet use dataset 'cifar10_jpg' "
                f"(a JPEG copy of CIFAR-10 that loads offline) or 'tiny_imagenet'; with internet "
                f"pass download=True or set {DOWNLOAD_ENV}=1.")
        _download(root, name)
        folder = expected

    meta = _read_pickle(folder / layout.meta_file)
    class_names = tuple(meta.get(layout.names_key, ()))
    if len(class_names) != layout.num_classes:
        raise DatasetError(f"{folder / layout.meta_file}: '{layout.names_key}' has "
                           f"{len(class_names)} names, expected {layout.num_classes}")

    images, labels = [], []
    for file_name in layout.train_files if split == "train" else layout.test_files:
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} is missing (expected the official "
                                    f"torchvision pickle '{file_name}' in {folder})")
        batch = _read_pickle(path)
        if "data" not in batch or layout.label_key not in batch:
            raise DatasetError(f"{path}: expected keys 'data' and '{layout.label_key}', "
                               f"found {sorted(batch)}")
        data = np.asarray(batch["data"])
        batch_labels = np.asarray(batch[layout.label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072")
        if batch_labels.shape != (len(data),):
            raise DatasetError(f"{path}: {len(batch_labels)} labels for {len(data)} images")
        if len(batch_labels) and not (0 <= batch_labels.min() and batch_labels.max() < layout.num_classes):
            raise DatasetError(f"{path}: labels outside 0..{layout.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels), class_names
