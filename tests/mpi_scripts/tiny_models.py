"""Tiny CNNs for the per-rank test programs; importing this module registers them in `models`.

tiny_cnn_no_bn: no batch norm, so data-parallel ranks cannot differ through per-rank batch
statistics (exact equality with one process holds). tiny_cnn_bn: the same with one BN layer.
"""
from torch import nn

import models


def _tiny_cnn(num_classes: int, bn: bool) -> nn.Module:
    norm = [nn.BatchNorm2d(8)] if bn else []
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


@models.register("tiny_cnn_no_bn")
def tiny_cnn_no_bn(num_classes: int) -> nn.Module:
    return _tiny_cnn(num_classes, bn=False)


@models.register("tiny_cnn_bn")
def tiny_cnn_bn(num_classes: int) -> nn.Module:
    return _tiny_cnn(num_classes, bn=True)
