"""ShardedLoader: normalised, augmented batches of an in-memory dataset, one shard per process.

Distributed: for training, every shard draws the same (seed, epoch) permutation; global batch i
is permutation[i*B*S : (i+1)*B*S] and shard r takes its r-th chunk of B. So S processes with
batch B see exactly the samples, and augmentations, of one process with batch B*S.
"""
from __future__ import annotations

import math

import torch

from data.augmentation import AUGMENTS, EpochPlan, draw_epoch_plan, flip_where, resized_crop, translate_crop


def check_shard(shard_rank: int, shard_count: int, batch_size: int) -> None:
    """ValueError unless 0 <= shard_rank < shard_count and batch_size >= 1."""
    if shard_count < 1 or not 0 <= shard_rank < shard_count:
        raise ValueError(f"shard_rank={shard_rank}, shard_count={shard_count}: expected "
                         f"shard_count >= 1 and 0 <= shard_rank < shard_count")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive per-shard batch size")


def train_shard_batches(order: torch.Tensor, batch_size: int, shard_rank: int, shard_count: int,
                        drop_last: bool) -> list[torch.Tensor]:
    """This shard's batches of example indices: chunk `shard_rank` of each global batch of `order`.

    With drop_last=False the last, partial global batch is split as evenly as possible, so
    shards may then differ by one batch (an allreduce per batch would hang on that).
    """
    global_batch = batch_size * shard_count
    num_full = len(order) // global_batch
    start = shard_rank * batch_size
    batches = [order[i * global_batch + start: i * global_batch + start + batch_size] for i in range(num_full)]
    tail = order[num_full * global_batch:]
    if not drop_last and len(tail) > shard_rank:
        batches.append(torch.tensor_split(tail, shard_count)[shard_rank])
    return batches


def eval_shard_indices(num_examples: int, shard_rank: int, shard_count: int) -> torch.Tensor:
    """Contiguous slice `shard_rank` of 0..N-1; the slices cover every example exactly once."""
    return torch.tensor_split(torch.arange(num_examples), shard_count)[shard_rank]


class ShardedLoader:
    """Batches (x float32 normalised NCHW, y int64) of one shard of an ArrayDataset.

    Args:
        dataset: an ArrayDataset (uint8 N x C x H x W images).
        batch_size: examples per batch on THIS shard; the global batch is batch_size * shard_count.
        train: shuffle and augment per (seed, epoch); False gives every example once, in order.
        augment: "cifar" (zero-pad crop_padding_px, crop, flip), "imagenet" (random resized crop
            with crop_scale/crop_ratio to the input size, flip) or None. Must be None if not train.
        shard_rank, shard_count: this process's shard. Distributed: pass the rank and size of
            the group that shares one model (a SWAP worker, an HWA group).
        seed: data-order and augmentation seed; SWAP phase 2 and HWA give each worker its own.
        device: where batches are made. The whole uint8 dataset is copied there once (no-op if
            it is already there; share one copy by passing dataset.to(device) to many loaders).
        drop_last: default True for train (equal batch counts on all shards), False for eval.
        channels_last: return x in channels_last memory format.

    Call set_epoch(epoch) before each epoch, as with DistributedSampler; it is the only state.
    """

    def __init__(self, dataset, batch_size: int, *, train: bool, augment: str | None,
                 shard_rank: int = 0, shard_count: int = 1, seed: int = 0, device="cpu",
                 drop_last: bool | None = None, channels_last: bool = False, crop_padding_px: int = 4,
                 crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        check_shard(shard_rank, shard_count, batch_size)
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r}, expected one of {AUGMENTS}")
        if augment is not None and not train:
            raise ValueError(f"augment={augment!r} with train=False: evaluation batches are never "
                             f"augmented; pass augment=None")
        if seed < 0:
            raise ValueError(f"seed={seed}: expected a non-negative integer")
        self.dataset, self.batch_size, self.train, self.augment = dataset, batch_size, train, augment
        self.shard_rank, self.shard_count, self.seed = shard_rank, shard_count, seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.crop_padding_px, self.crop_scale, self.crop_ratio = crop_padding_px, crop_scale, crop_ratio
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        channels = self.images.shape[1]
        # Normalising in 0..255 units saves a division per pixel.
        self._mean_255 = torch.tensor(dataset.mean, device=self.device).view(1, channels, 1, 1) * 255
        self._inv_std_255 = 1 / (torch.tensor(dataset.std, device=self.device).view(1, channels, 1, 1) * 255)
        self.epoch = 0
        # An empty eval shard is fine (its metrics sum to zero); an empty training epoch is a bug.
        if train and len(self) == 0:
            raise ValueError(f"dataset '{dataset.name}' has {len(self.labels)} examples: no training batch "
                             f"for shard {shard_rank} of {shard_count} at batch_size={batch_size}, "
                             f"drop_last={self.drop_last}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: expected a non-negative integer")
        self.epoch = epoch

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The order, crops and flips of every example in `epoch` (CPU tensors, same on all shards)."""
        num = len(self.labels)
        if not self.train:
            return EpochPlan(torch.arange(num))
        return draw_epoch_plan(num, tuple(self.images.shape[-2:]), self.augment, self.seed, epoch,
                               crop_padding_px=self.crop_padding_px, crop_scale=self.crop_scale,
                               crop_ratio=self.crop_ratio)

    def batch_indices(self, epoch: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Example indices of each batch this shard yields in `epoch`."""
        if order is None:
            order = self.epoch_plan(epoch).order
        if self.train:
            return train_shard_batches(order, self.batch_size, self.shard_rank, self.shard_count, self.drop_last)
        mine = order[eval_shard_indices(len(order), self.shard_rank, self.shard_count)]
        batches = [b for b in torch.split(mine, self.batch_size) if len(b)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        num = len(self.labels)
        if self.train:
            global_batch = self.batch_size * self.shard_count
            tail = num % global_batch
            return num // global_batch + int(not self.drop_last and tail > self.shard_rank)
        mine = len(eval_shard_indices(num, self.shard_rank, self.shard_count))
        return mine // self.batch_size if self.drop_last else math.ceil(mine / self.batch_size)

    def __iter__(self):
        plan = self.epoch_plan(self.epoch).to(self.device)
        height_width = tuple(self.images.shape[-2:])
        for index in self.batch_indices(self.epoch, plan.order):
            x, y = self.images[index], self.labels[index]
            if self.augment == "cifar":
                x = flip_where(translate_crop(x, plan.crop[index], self.crop_padding_px), plan.flip[index])
                x = x.float()
            elif self.augment == "imagenet":
                x = resized_crop(x.float(), plan.crop[index], plan.flip[index], height_width)
            else:
                x = x.float()
            x = x.sub_(self._mean_255).mul_(self._inv_std_255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
