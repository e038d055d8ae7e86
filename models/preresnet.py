"""Pre-activation ResNets for CIFAR (He et al. 2016), as used by SWA and SWALP.

PreResNet-110 stacks 3 x 18 basic blocks (two 3x3 convs); PreResNet-164 stacks
3 x 18 bottleneck blocks (1x1, 3x3, 1x1 with 4x expansion). Stage widths are 16,
32, 64 (x4 at the bottleneck output). As in the SWA/SWALP code: convs have no bias,
a stage-changing block projects its shortcut with a bare 1x1 conv applied to the
block's raw input, and a final BN-ReLU precedes global average pooling.
"""

import torch
import torch.nn as nn

from models.init import kaiming_fan_out_
from models.registry import register


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 (x4), plus shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + self.shortcut(x)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


Block = type[PreActBasicBlock] | type[PreActBottleneck]


class PreResNet(nn.Module):
    """CIFAR pre-activation ResNet with three stages of `blocks_per_stage` blocks.

    Args:
        num_classes: output size.
        block: PreActBasicBlock (depth 6n+2) or PreActBottleneck (depth 9n+2).
        blocks_per_stage: n.

    Init as in the SWA/SWALP code: convs N(0, 2 / (k*k*out_channels)) (Kaiming,
    fan-out), BN weight 1 and bias 0, the linear layer PyTorch's default.
    """

    def __init__(self, num_classes: int, block: Block, blocks_per_stage: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages, in_channels = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(block(in_channels, channels, stride if i == 0 else 1))
                in_channels = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        # Adaptive so other input sizes work; at 32x32 this is the papers' 8x8 pool.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_fan_out_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


@register("preresnet110")
def preresnet110(num_classes: int) -> nn.Module:
    """PreResNet-110 (basic blocks, 18 per stage) for 32x32 inputs: 1.73 M params.

    This is He et al.'s network. The SWA repository's `PreResNet110` differs: its
    depth rule picks bottleneck blocks for any depth >= 44, giving 12 bottleneck
    blocks per stage (still 110 weight layers, 1.15 M params at 10 classes).
    """
    return PreResNet(num_classes, PreActBasicBlock, blocks_per_stage=(110 - 2) // 6)


@register("preresnet164")
def preresnet164(num_classes: int) -> nn.Module:
    """PreResNet-164 (bottleneck blocks, 18 per stage) for 32x32 inputs: 1.70 M params.

    Same network as SWA's `PreResNet164` and SWALP's `PreResNet164LP` (which
    reaches it with depth=110 and (110-2)//6 = 18 bottleneck blocks per stage).
    """
    return PreResNet(num_classes, PreActBottleneck, blocks_per_stage=(164 - 2) // 9)
