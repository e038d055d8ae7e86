"""ShardedLoader: sharding, data order and augmentation, against oracles computed by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import data
from data.augmentation import draw_epoch_plan, flip_where, resized_crop, translate_crop
from data_helpers import epoch_batches, make_dataset, normalise

# ---------------------------------------------------------------- sharding and order

@pytest.mark.parametrize("augment", [None, "cifar", "imagenet"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_shards_together_equal_one_process_with_the_global_batch(augment, shards):
    ds, batch = make_dataset(), 4
    single = data.ShardedLoader(ds, batch * shards, train=True, augment=augment, seed=3)
    loaders = [data.ShardedLoader(ds, batch, train=True, augment=augment, shard_rank=r,
                                  shard_count=shards, seed=3) for r in range(shards)]
    assert {len(loader) for loader in loaders} == {len(single)} == {len(ds) // (batch * shards)}
    for epoch in (0, 1):
        per_shard = [epoch_batches(loader, epoch) for loader in loaders]
        reference = epoch_batches(single, epoch)
        for i, (x_ref, y_ref) in enumerate(reference):
            assert torch.equal(torch.cat([b[i][1] for b in per_shard]), y_ref)
            assert torch.equal(torch.cat([b[i][0] for b in per_shard]), x_ref)
        seen = torch.cat([y for _, y in reference])
        assert len(seen.unique()) == len(seen) == len(ds) - len(ds) % (batch * shards)


def test_same_seed_and_epoch_repeat_other_seeds_and_epochs_differ():
    ds = make_dataset()
    def make(seed):
        return data.ShardedLoader(ds, 8, train=True, augment="cifar", seed=seed)

    first, again = epoch_batches(make(0), 5), epoch_batches(make(0), 5)  # a fresh loader = a resumed run
    assert first and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                         for a, b in zip(first, again, strict=True))
    def order(batches):
        return torch.cat([y for _, y in batches])

    assert not torch.equal(order(first), order(epoch_batches(make(1), 5)))
    assert not torch.equal(order(first), order(epoch_batches(make(0), 6)))


@pytest.mark.parametrize("num,shards", [(103, 1), (103, 2), (103, 3), (103, 4), (3, 4)])
def test_eval_shards_cover_every_example_once(num, shards):
    ds = make_dataset(num)
    loaders = [data.ShardedLoader(ds, 8, train=False, augment=None, shard_rank=r, shard_count=shards,
                                  channels_last=True) for r in range(shards)]
    batches = [b for loader in loaders for b in loader]
    assert sum(len(loader) for loader in loaders) == len(batches)
    y = torch.cat([y for _, y in batches])
    assert sorted(y.tolist()) == list(range(len(ds)))
    x = torch.cat([x for x, _ in batches])
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    assert torch.allclose(x, normalise(ds.images[y], ds), atol=1e-5)
    ds = make_dataset()
    with pytest.raises(ValueError, match="augment"):
        data.ShardedLoader(ds, 8, train=False, augment="cifar")


# ---------------------------------------------------------------- augmentation oracles

def test_translate_crop_equals_padded_slice_by_hand():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).reshape(2, 3, 6, 6).to(torch.uint8)
    offsets = torch.tensor([[0, 0], [3, 1]])
    out = translate_crop(images, offsets, padding_px=2)
    # Offset (0, 0) shifts the image down-right by 2: two zero rows and columns, then image[:4, :4].
    assert (out[0, :, :2, :] == 0).all() and (out[0, :, :, :2] == 0).all()
    assert torch.equal(out[0, :, 2:, 2:], images[0, :, :4, :4])
    padded = np.pad(images[1].numpy(), ((0, 0), (2, 2), (2, 2)))
    assert np.array_equal(out[1].numpy(), padded[:, 3:9, 1:7])
    assert torch.equal(flip_where(out, torch.tensor([True, False]))[0], torch.flip(out[0], dims=[-1]))


def test_loader_batch_equals_its_plan_applied_by_hand():
    ds = make_dataset(num=40, size=32)
    loader = data.ShardedLoader(ds, 10, train=True, augment="cifar", shard_rank=1, shard_count=2, seed=7)
    loader.set_epoch(2)
    plan = loader.epoch_plan(2)
    x, y = next(iter(loader))
    assert torch.equal(y, plan.order[10:20])  # shard 1's chunk of global batch 0
    for row, k in enumerate(y.tolist()):
        top, left = plan.crop[k].tolist()
        expected = F.pad(ds.images[k], (4, 4, 4, 4))[:, top:top + 32, left:left + 32]
        if plan.flip[k]:
            expected = torch.flip(expected, dims=[-1])
        assert torch.allclose(x[row], normalise(expected[None], ds)[0], atol=1e-5)


def test_resized_crop_matches_torchvision_and_flip():
    images = torch.rand(3, 3, 20, 24) * 255
    full = torch.tensor([[0, 0, 20, 24]] * 3)
    no_flip, flip = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    assert torch.allclose(resized_crop(images, full, no_flip, (20, 24)), images, atol=1e-3)
    assert torch.allclose(resized_crop(images, full, flip, (20, 24)), torch.flip(images, dims=[-1]), atol=1e-3)
    boxes = torch.tensor([[3, 5, 9, 14], [0, 10, 20, 7], [11, 0, 6, 6]])
    out = resized_crop(images, boxes, torch.tensor([False, True, False]), (20, 24))
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(images[i], top, left, h, w, [20, 24], antialias=False)
        expected = torch.flip(expected, dims=[-1]) if i == 1 else expected
        assert torch.allclose(out[i], expected, atol=1e-2)


def test_augmentation_draws_have_the_intended_distribution():
    plan = draw_epoch_plan(20000, (64, 48), "imagenet", seed=0, epoch=0, crop_scale=(0.35, 1.0))
    top, left, h, w = plan.crop.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    area = (h * w).float() / (64 * 48)
    assert area.min() > 0.33 and area.max() <= 1
    assert abs(plan.flip.float().mean().item() - 0.5) < 0.02  # 7 standard deviations
    offsets = draw_epoch_plan(20000, (32, 32), "cifar", seed=0, epoch=0).crop
    assert offsets.min() == 0 and offsets.max() == 8
    assert torch.bincount(offsets[:, 0], minlength=9).min() > 20000 / 9 * 0.9
