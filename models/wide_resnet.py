"""WideResNet-28-10 (Zagoruyko & Komodakis 2016) for CIFAR, used by SWA.

Three stages of 4 pre-activation blocks (BN-ReLU-conv3x3, [dropout], BN-ReLU-conv3x3)
at widths 160, 320, 640, after a 16-channel stem conv; a stage's first block
strides and projects its shortcut with a 1x1 conv applied to the pre-activated input.
36.48 M params at 10 classes (paper: 36.5 M).

Differences from the SWA repository's copy, which follows another port: ours
keeps the WRN paper's bias-free convs (the SWA copy adds conv biases, +10,096
params) and the stride on the first conv of a block (SWA's is on the second);
the final BN uses PyTorch's default momentum (the SWA copy sets 0.9, which in
PyTorch's convention weights new batches at 90%).
"""

import torch
import torch.nn as nn

from models.init import kaiming_fan_out_
from models.registry import register


class WideBasicBlock(nn.Module):
    """Pre-activation block with two 3x3 convs and dropout between them."""

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projection sees the same pre-activated input as conv1 (WRN paper);
        # an identity shortcut carries the raw input.
        preact = self.relu(self.bn1(x))
        out = self.conv1(preact)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(preact))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for CIFAR.

    Args:
        num_classes: output size.
        depth: 6n+4 (28 gives n=4 blocks per stage).
        widen_factor: k; stage widths are 16k, 32k, 64k.
        dropout: drop probability inside each block (WRN paper: 0.3 optional; SWA: 0).

    Init as in the WRN paper's Torch7 code: convs Kaiming normal (fan-out), BN
    weight 1 and bias 0, linear weight PyTorch's default and bias 0.
    """

    def __init__(self, num_classes: int, depth: int = 28, widen_factor: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages, in_channels = [], 16
        for base, stride in ((16, 1), (32, 2), (64, 2)):
            channels = base * widen_factor
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(WideBasicBlock(in_channels, channels,
                                             stride if i == 0 else 1, dropout))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_fan_out_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


@register("wrn28_10")
def wrn28_10(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """WideResNet-28-10 for 32x32 inputs; `dropout` inside blocks (default 0, as SWA)."""
    return WideResNet(num_classes, depth=28, widen_factor=10, dropout=dropout)
