"""Data for the weight-averaging experiments: in-memory datasets, sharded loaders, ImageNet folders.

  load_dataset(name, root, split, ...) -> ArrayDataset   CIFAR-10/100, CIFAR-10 JPEG copy, Tiny-ImageNet
  ShardedLoader(dataset, batch_size, train=..., ...)     batches of one shard, per-(seed, epoch) order
  build_image_folder_loader(root, split, ...)             full-size ImageNet streamed from class folders
"""
from data.archive import DatasetError
from data.augmentation import EpochPlan, draw_epoch_plan
from data.dataset import DATASET_NAMES, STATS, ArrayDataset, holdout_split, load_dataset, resize_images
from data.image_folder import ImageFolderLoader, build_image_folder_loader
from data.sharded_loader import ShardedLoader

__all__ = ["ArrayDataset", "DATASET_NAMES", "DatasetError", "EpochPlan", "ImageFolderLoader", "STATS",
           "ShardedLoader", "build_image_folder_loader", "draw_epoch_plan", "holdout_split", "load_dataset",
           "resize_images"]
