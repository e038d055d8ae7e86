"""Tiny-ImageNet-200 (64x64), from the official archive or an extracted class-folder tree.

Accepted layouts, relative to the archive's top folder or to the extracted root:
  train/<wnid>/images/*.JPEG  or  train/<wnid>/*.JPEG          (training images)
  val/images/*.JPEG + val/val_annotations.txt  or  val/<wnid>/*.JPEG   (the "test" split)
  wnids.txt (optional for folders: the train/ subfolders name the classes otherwise)
Labels index the sorted wnids; num_classes=K keeps the first K, and only those are decoded.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.archive import DatasetError, decode_rgb, iter_tar_files
from data.cache import (
    CACHE_FORMAT_VERSION,
    cache_lock,
    file_fingerprint,
    listing_fingerprint,
    read_arrays,
    write_arrays_,
)

TAR_NAME = "tiny-imagenet-200-trainval.tar.xz"
IMAGE_HW = (64, 64)
OFFICIAL_PER_CLASS = {"train": 500, "test": 50}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
log = logging.getLogger(__name__)


def _natural_key(name: str) -> tuple:
    # val_2 before val_10, as the files were numbered.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class _Collector:
    """Decodes the wanted images of a stream of (relative path, bytes) items, in any order.

    Which classes are wanted is known only after wnids.txt (and val_annotations.txt for flat
    val images) went by; images arriving earlier keep their encoded bytes until then.
    """

    def __init__(self, source: Path, num_classes: int | None):
        self.source, self.num_classes = source, num_classes
        self.wanted: dict[str, int] | None = None
        self.val_wnid: dict[str, str] | None = None
        self.train: list[tuple[tuple, int, np.ndarray]] = []
        self.test: list[tuple[tuple, int, np.ndarray]] = []
        self.pending: list[tuple[list[str], bytes]] = []

    def set_wnids(self, wnids: list[str]) -> None:
        ordered = sorted(set(wnids))
        k = self.num_classes if self.num_classes is not None else len(ordered)
        if not 0 < k <= len(ordered):
            raise ValueError(f"tiny_imagenet: num_classes={self.num_classes}, expected 1..{len(ordered)} "
                             f"({len(ordered)} wnids in {self.source})")
        self.wanted = {wnid: label for label, wnid in enumerate(ordered[:k])}
        self._retry_pending()

    def offer(self, parts: list[str], read: Callable[[], bytes]) -> None:
        if parts == ["wnids.txt"]:
            self.set_wnids(read().decode().split())
        elif parts == ["val", "val_annotations.txt"]:
            lines = (line.split("\t") for line in read().decode().splitlines() if line.strip())
            self.val_wnid = {fields[0]: fields[1] for fields in lines}
            self._retry_pending()
        elif parts[0] in ("train", "val") and parts[-1].lower().endswith(IMAGE_SUFFIXES):
            self._offer_image(parts, read)

    def _offer_image(self, parts: list[str], read: Callable[[], bytes]) -> None:
        flat_val = parts[:2] == ["val", "images"] and len(parts) == 3
        if self.wanted is None or (flat_val and self.val_wnid is None):
            self.pending.append((parts, read()))
            return
        wnid = self.val_wnid.get(parts[2]) if flat_val else parts[1]
        if wnid is None:
            raise DatasetError(f"{self.source}: {'/'.join(parts)} is not in val/val_annotations.txt")
        if wnid in self.wanted:
            label = self.wanted[wnid]
            pixels = decode_rgb(read(), f"{self.source}:{'/'.join(parts)}", IMAGE_HW)
            # Training images sort by class then number; flat val images by their number.
            sort_key = _natural_key(parts[-1]) if flat_val else (label, _natural_key(parts[-1]))
            (self.test if parts[0] == "val" else self.train).append((sort_key, label, pixels))

    def _retry_pending(self) -> None:
        waiting, self.pending = self.pending, []
        for parts, blob in waiting:
            self._offer_image(parts, lambda blob=blob: blob)

    def finish(self, train_wnids: set[str], expect_official: bool) -> dict[str, np.ndarray]:
        if self.wanted is None:
            self.set_wnids(sorted(train_wnids))
        if self.pending:
            raise DatasetError(f"{self.source}: val/images/* found but no val/val_annotations.txt "
                               f"to label them")
        arrays = {}
        for split, items in (("train", self.train), ("test", self.test)):
            items.sort(key=lambda item: item[0])
            labels = np.array([label for _, label, _ in items], np.int64)
            counts = np.bincount(labels, minlength=len(self.wanted))
            expected = OFFICIAL_PER_CLASS[split]
            if (expect_official and (counts != expected).any()) or not counts.all():
                raise DatasetError(
                    f"{self.source}: {split} per-class image counts {sorted(set(counts.tolist()))} for "
                    f"the first {len(self.wanted)} classes; expected "
                    f"{expected if expect_official else 'at least 1'} per class")
            # Filled in place: the full set is 1.2 GB, so no stacked HWC intermediate.
            images = np.empty((len(items), 3, *IMAGE_HW), np.uint8)
            for i, (_, _, pixels) in enumerate(items):
                images[i] = pixels.transpose(2, 0, 1)
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = labels
        arrays["wnids"] = np.array(list(self.wanted))
        return arrays


def _relative_parts(name: str) -> list[str]:
    parts = name.split("/")
    # Members of the archive sit under one top folder (tiny-imagenet-200-sub200/).
    return parts[1:] if parts[0] not in ("train", "val", "wnids.txt") else parts


def _decode_tar(tar_path: Path, num_classes: int | None) -> dict[str, np.ndarray]:
    collector, train_wnids = _Collector(tar_path, num_classes), set()
    for name, blob in iter_tar_files(tar_path):
        parts = _relative_parts(name)
        if len(parts) >= 3 and parts[0] == "train":
            train_wnids.add(parts[1])
        collector.offer(parts, lambda blob=blob: blob)
    return collector.finish(train_wnids, expect_official=True)


def _list_folder(root: Path) -> list[Path]:
    files = [root / "wnids.txt"] if (root / "wnids.txt").is_file() else []
    for split in ("train", "val"):
        for folder, _, names in os.walk(root / split):
            files += [Path(folder) / n for n in sorted(names)]
    return files


def _decode_folder(root: Path, files: list[Path], num_classes: int | None) -> dict[str, np.ndarray]:
    collector = _Collector(root, num_classes)
    relative = [f.relative_to(root).parts for f in files]
    train_wnids = {parts[1] for parts in relative if len(parts) >= 3 and parts[0] == "train"}
    if not (root / "wnids.txt").is_file():
        collector.set_wnids(sorted(train_wnids))
    # Metadata first, so only the wanted classes' images are ever read from disk.
    metadata_first = sorted(zip(relative, files), key=lambda rf: not rf[0][-1].endswith(".txt"))
    for parts, path in metadata_first:
        collector.offer(list(parts), path.read_bytes)
    return collector.finish(train_wnids, expect_official=False)


def find_source(root: Path) -> tuple[str, Path]:
    """("tar", archive) or ("folder", extracted root); FileNotFoundError listing the places tried."""
    if root.is_file():
        return "tar", root
    for folder in (root, root / "tiny-imagenet-200", root / "tiny-imagenet"):
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            return "folder", folder
    tried = [root / "tiny-imagenet" / TAR_NAME, root / TAR_NAME]
    for tar_path in tried:
        if tar_path.is_file():
            return "tar", tar_path
    raise FileNotFoundError(
        f"tiny_imagenet: none of {[str(p) for p in tried]} exists, and {root} has no train/ and "
        f"val/ folders; expected the Tiny-ImageNet-200 archive or its extracted class folders")


def load_tiny_imagenet(root: Path, split: str, cache_dir: Path, num_classes: int | None
                       ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images (N x 3 x 64 x 64 uint8), labels (int64) and wnids of the first `num_classes` classes.

    split "test" is the official validation set. The first call decodes both splits and caches
    them, keyed by the source's checksum and K; a cached all-class decode also serves any K.
    """
    kind, source = find_source(root)
    files = _list_folder(source) if kind == "folder" else []
    fingerprint = file_fingerprint(source) if kind == "tar" else listing_fingerprint(files, source)
    base = f"tiny_imagenet-{fingerprint[:16]}"
    key = f"{base}-k{num_classes or 'all'}-v{CACHE_FORMAT_VERSION}"
    keys = ("images", "labels", "wnids")
    cached = read_arrays(cache_dir / f"{key}-{split}.npz", keys)
    if cached is None and num_classes is not None:
        full = read_arrays(cache_dir / f"{base}-kall-v{CACHE_FORMAT_VERSION}-{split}.npz", keys)
        if full is not None and num_classes <= len(full["wnids"]):
            keep = full["labels"] < num_classes
            cached = {"images": full["images"][keep], "labels": full["labels"][keep],
                      "wnids": full["wnids"][:num_classes]}
    if cached is None:
        with cache_lock(cache_dir / key):
            cached = read_arrays(cache_dir / f"{key}-{split}.npz", keys)
            if cached is None:
                start = time.perf_counter()
                if kind == "tar":
                    arrays = _decode_tar(source, num_classes)
                else:
                    arrays = _decode_folder(source, files, num_classes)
                log.info("decoded %s (num_classes=%s) in %.1f s", source, num_classes,
                         time.perf_counter() - start)
                wnids = arrays["wnids"]
                for s in ("train", "test"):
                    write_arrays_(cache_dir / f"{key}-{s}.npz", {
                        "images": arrays[f"{s}_images"], "labels": arrays[f"{s}_labels"], "wnids": wnids})
                cached = {"images": arrays[f"{split}_images"], "labels": arrays[f"{split}_labels"],
                          "wnids": wnids}
    return cached["images"], cached["labels"], tuple(str(w) for w in cached["wnids"])
