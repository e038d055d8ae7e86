"""Streaming loader for full-size ImageNet in class folders (root/train/<wnid>/*.JPEG, root/val/<wnid>/*).

Same sharding contract as ShardedLoader: one (seed, epoch) permutation on every shard, shard r
takes chunk r of each global batch. The random crop and flip of example i in an epoch come from
a generator seeded by (seed, epoch, i), so they too do not depend on the number of shards or
DataLoader workers.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.augmentation import epoch_generator
from data.dataset import IMAGENET_MEAN, IMAGENET_STD
from data.sharded_loader import check_shard, eval_shard_indices, train_shard_batches

SPLIT_FOLDERS = {"train": ("train",), "val": ("val",), "test": ("val", "test")}


class ShardSampler(Sampler):
    """Indices of one shard, batch after batch, for an epoch chosen with set_epoch."""

    def __init__(self, num_examples: int, batch_size: int, *, train: bool, shard_rank: int,
                 shard_count: int, seed: int, drop_last: bool):
        self.num_examples, self.batch_size, self.train = num_examples, batch_size, train
        self.shard_rank, self.shard_count, self.seed, self.drop_last = shard_rank, shard_count, seed, drop_last
        self.epoch = 0

    def batches(self) -> list[torch.Tensor]:
        if self.train:
            order = torch.randperm(self.num_examples, generator=epoch_generator(self.seed, self.epoch))
            return train_shard_batches(order, self.batch_size, self.shard_rank, self.shard_count, self.drop_last)
        mine = [b for b in torch.split(eval_shard_indices(self.num_examples, self.shard_rank, self.shard_count),
                                       self.batch_size) if len(b)]
        return mine[:-1] if self.drop_last and mine and len(mine[-1]) < self.batch_size else mine

    def __iter__(self):
        for batch in self.batches():
            yield from batch.tolist()

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())


class SeededTransforms(Dataset):
    """A torchvision ImageFolder whose random transforms for example i are seeded by (seed, epoch, i).

    The global torch RNG is forked around each transform, so neither the training process
    (num_workers=0) nor a worker's stream is disturbed. Costs ~20 us per image, small next to
    decoding a full-size JPEG (~5-10 ms).
    """

    def __init__(self, folder, seed: int, randomised: bool):
        self.folder, self.seed, self.randomised, self.epoch = folder, seed, randomised, 0

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        if not self.randomised:
            return self.folder[index]
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, dtype=np.uint64)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state))
            return self.folder[index]


class ImageFolderLoader:
    """Batches (x float32 normalised 3 x S x S, y int64) of one shard of an image folder."""

    def __init__(self, dataset: SeededTransforms, sampler: ShardSampler, loader: DataLoader):
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self.classes = dataset.folder.classes
        self.num_classes = len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order and augmentation (workers are re-created each epoch and see it)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: expected a non-negative integer")
        self.sampler.epoch = self.dataset.epoch = epoch

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.batch_size)


def build_image_folder_loader(root: str | Path, split: str, batch_size: int, *, train: bool,
                              shard_rank: int = 0, shard_count: int = 1, seed: int = 0,
                              num_workers: int = 4, image_size: int = 224, drop_last: bool | None = None,
                              crop_scale: tuple[float, float] = (0.08, 1.0),
                              pin_memory: bool = False) -> ImageFolderLoader:
    """A sharded loader over root/<split>/<class>/<image> with the standard ImageNet transforms.

    Args:
        root: folder holding train/ and val/ (class subfolders; labels follow sorted names).
        split: "train", "val" or "test" (the latter reads val/, else test/).
        batch_size: per shard. train: RandomResizedCrop(image_size, crop_scale) + flip, shuffled
            per (seed, epoch); eval: Resize(image_size * 256/224) + CenterCrop(image_size), in order.
        shard_rank, shard_count, seed, drop_last: as for ShardedLoader.
        num_workers: DataLoader worker processes (0 decodes in this process).
    """
    # Imported here: torchvision costs seconds to import, and in-memory runs never need it.
    import torchvision
    from torchvision import transforms as T

    check_shard(shard_rank, shard_count, batch_size)
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split {split!r}, expected one of {tuple(SPLIT_FOLDERS)}")
    root = Path(root).expanduser()
    candidates = [root / name for name in SPLIT_FOLDERS[split]]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"image folder: {candidates[0]} is missing; expected class folders "
                                f"{candidates[0]}/<class>/<image>.JPEG (the ImageNet layout)")
    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        transform = T.Compose([T.RandomResizedCrop(image_size, scale=crop_scale),
                               T.RandomHorizontalFlip(), *normalise])
    else:
        transform = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *normalise])
    dataset = SeededTransforms(torchvision.datasets.ImageFolder(str(folder), transform=transform), seed, train)
    sampler = ShardSampler(len(dataset), batch_size, train=train, shard_rank=shard_rank,
                           shard_count=shard_count, seed=seed, drop_last=train if drop_last is None else drop_last)
    # The sampler already yields whole batches, so the DataLoader just groups them.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=False, persistent_workers=False)
    return ImageFolderLoader(dataset, sampler, loader)
