"""CIFAR-10 from the JPEG copy (cifar10_jpg.tar.xz + cifar10_jpg_index.csv.gz), decoded once and cached.

The archive holds train/<class>/NNNN.jpg and test/<class>/NNNN.jpg. The index csv
(split,orig_index,label,class,path) maps each official training index to its JPEG, so the
training set comes out in the official CIFAR-10 order; the test rows with an orig_index come
first in that order, then the class-sorted rest, as the csv lists them.
"""
from __future__ import annotations

import csv
import gzip
import logging
import time
from pathlib import Path

import numpy as np

from data.archive import DatasetError, decode_rgb, iter_tar_files
from data.cache import CACHE_FORMAT_VERSION, cache_lock, file_fingerprint, read_arrays, write_arrays_

TAR_NAME = "cifar10_jpg.tar.xz"
INDEX_NAME = "cifar10_jpg_index.csv.gz"
# The official class order of batches.meta; labels index into it.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
EXPECTED_PER_CLASS = {"train": 5000, "test": 1000}
log = logging.getLogger(__name__)


def find_files(root: Path) -> tuple[Path, Path]:
    """(tar, csv) under root/cifar10/ or root/; FileNotFoundError naming both places tried."""
    for folder in (root / "cifar10", root):
        if (folder / TAR_NAME).is_file():
            csv_path = folder / INDEX_NAME
            if not csv_path.is_file():
                raise FileNotFoundError(f"cifar10_jpg: {csv_path} is missing; it must sit next to "
                                        f"{folder / TAR_NAME} (columns split,orig_index,label,class,path)")
            return folder / TAR_NAME, csv_path
    raise FileNotFoundError(f"cifar10_jpg: neither {root / 'cifar10' / TAR_NAME} nor {root / TAR_NAME} "
                            f"exists; expected the JPEG copy of CIFAR-10 and {INDEX_NAME} beside it")


def read_index(csv_path: Path) -> dict[str, list[tuple[str, int]]]:
    """Per split, the (path, label) list in dataset order, after checking every row and count."""
    rows: dict[str, list[tuple[int | None, int, str]]] = {"train": [], "test": []}
    try:
        with gzip.open(csv_path, "rt", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != ["split", "orig_index", "label", "class", "path"]:
                raise DatasetError(f"{csv_path}: header {reader.fieldnames}, expected "
                                   f"split,orig_index,label,class,path")
            for line, row in enumerate(reader, start=2):
                label = int(row["label"])
                parts = row["path"].split("/")
                if (row["split"] not in rows or not 0 <= label < len(CLASSES)
                        or row["class"] != CLASSES[label] or len(parts) != 3
                        or parts[0] != row["split"] or parts[1] != CLASSES[label]):
                    raise DatasetError(
                        f"{csv_path}: line {line}: split '{row['split']}', label {row['label']}, "
                        f"class '{row['class']}', path '{row['path']}' disagree; expected "
                        f"path <split>/<class>/NNNN.jpg with class = {CLASSES}[label]")
                orig = int(row["orig_index"]) if row["orig_index"] else None
                rows[row["split"]].append((orig, label, row["path"]))
    except (OSError, EOFError, ValueError, csv.Error) as err:
        raise DatasetError(f"{csv_path}: cannot read the index csv ({err})") from err

    ordered = {}
    for split, entries in rows.items():
        counts = np.bincount([label for _, label, _ in entries], minlength=len(CLASSES))
        expected = EXPECTED_PER_CLASS[split]
        if len(entries) != expected * len(CLASSES) or (counts != expected).any():
            raise DatasetError(f"{csv_path}: {split} has {len(entries)} rows with per-class counts "
                               f"{counts.tolist()}; expected {expected} per class")
        indexed = sorted((e for e in entries if e[0] is not None), key=lambda e: e[0])
        if [e[0] for e in indexed] != list(range(len(indexed))):
            raise DatasetError(f"{csv_path}: {split} orig_index values are not 0..{len(indexed) - 1}")
        if split == "train" and len(indexed) != len(entries):
            raise DatasetError(f"{csv_path}: every train row needs an orig_index (official order)")
        rest = [e for e in entries if e[0] is None]
        ordered[split] = [(path, label) for _, label, path in indexed + rest]
    all_paths = [p for split in ordered.values() for p, _ in split]
    if len(set(all_paths)) != len(all_paths):
        raise DatasetError(f"{csv_path}: some paths are listed twice")
    return ordered


def _decode_archive(tar_path: Path, index: dict[str, list[tuple[str, int]]]) -> dict[str, np.ndarray]:
    position = {path: (split, i) for split, entries in index.items() for i, (path, _) in enumerate(entries)}
    images = {split: np.zeros((len(entries), 32, 32, 3), np.uint8) for split, entries in index.items()}
    found = {split: np.zeros(len(entries), bool) for split, entries in index.items()}
    start = time.perf_counter()
    for name, blob in iter_tar_files(tar_path):
        if name not in position:
            if name.lower().endswith(".jpg"):
                raise DatasetError(f"{tar_path}: member '{name}' is not listed in {INDEX_NAME}")
            continue
        split, i = position[name]
        images[split][i] = decode_rgb(blob, f"{tar_path}:{name}", expected_hw=(32, 32))
        found[split][i] = True
    for split, entries in index.items():
        if not found[split].all():
            first = entries[int(np.argmin(found[split]))][0]
            raise DatasetError(f"{tar_path}: {int((~found[split]).sum())} {split} images listed in "
                               f"{INDEX_NAME} are missing from the archive (first: {first}); expected "
                               f"{len(entries)} {split} JPEGs")
    log.info("decoded %s in %.1f s", tar_path, time.perf_counter() - start)
    arrays = {}
    for split, entries in index.items():
        arrays[f"{split}_images"] = np.ascontiguousarray(images[split].transpose(0, 3, 1, 2))
        arrays[f"{split}_labels"] = np.array([label for _, label in entries], np.int64)
    return arrays


def load_cifar10_jpg(root: Path, split: str, cache_dir: Path
                     ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images (N x 3 x 32 x 32 uint8), labels (int64) and class names of one split.

    The first call decodes both splits in one pass over the archive and caches them under
    `cache_dir` in files named by the checksums of the archive and the index.
    """
    tar_path, csv_path = find_files(root)
    # The csv is checked on every load: it is small, and a mislabelled index must never pass.
    index = read_index(csv_path)
    key = (f"cifar10_jpg-{file_fingerprint(tar_path)[:16]}-{file_fingerprint(csv_path)[:12]}"
           f"-v{CACHE_FORMAT_VERSION}")
    paths = {s: cache_dir / f"{key}-{s}.npz" for s in index}
    keys = ("images", "labels")
    cached = read_arrays(paths[split], keys)
    if cached is None:
        with cache_lock(cache_dir / key):
            cached = read_arrays(paths[split], keys)
            if cached is None:
                arrays = _decode_archive(tar_path, index)
                for s, path in paths.items():
                    write_arrays_(path, {k: arrays[f"{s}_{k}"] for k in keys})
                cached = {k: arrays[f"{split}_{k}"] for k in keys}
    expected_labels = np.array([label for _, label in index[split]], np.int64)
    if cached["images"].shape != (len(expected_labels), 3, 32, 32) or not np.array_equal(
            cached["labels"], expected_labels):
        raise DatasetError(f"{paths[split]}: cached arrays disagree with {csv_path}; delete the cache file")
    return cached["images"], cached["labels"], CLASSES
