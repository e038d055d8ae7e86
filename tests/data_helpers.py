"""Helpers shared by the data tests: a self-describing synthetic dataset and batch collectors."""
import itertools

import torch

import data


def make_dataset(num=103, channels=3, size=8, seed=0) -> data.ArrayDataset:
    """Random images whose label is their index, so every yielded sample names itself."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num, channels, size, size), dtype=torch.uint8, generator=g)
    return data.ArrayDataset(images, torch.arange(num), num, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "synthetic")


def normalise(images: torch.Tensor, ds: data.ArrayDataset) -> torch.Tensor:
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def first_batches(loader, epoch, count=3):
    loader.set_epoch(epoch)
    return list(itertools.islice(loader, count))
