"""ResNet-9 from the DAWNBench CIFAR-10 entry (David Page, 2018), used by SWAP.

Shape: prep conv(w) -> conv(2w)+pool + residual(2 x conv(2w)) -> conv(4w)+pool
-> conv(8w)+pool + residual(2 x conv(8w)) -> global max pool -> linear (no bias)
-> x 0.125. Every conv is 3x3, no bias, followed by BatchNorm and ReLU.
"""

import torch
import torch.nn as nn

from models.registry import register


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """x + f(x), with f two conv-BN-ReLU layers at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(channels, channels),
                                  _conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """DAWNBench ResNet-9.

    Args:
        num_classes: output size.
        width: channels of the first conv; the stages use width x (1, 2, 4, 8).
            64 is the DAWNBench network (6.57 M params at 10 classes).
        output_scale: multiplies the logits; 0.125 in the DAWNBench entry, where it
            stands in for a lower LR on the final layer / a softer softmax.

    Weights keep PyTorch's default init, as the DAWNBench code did. The global max
    pool is adaptive, so 64x64 inputs (Tiny-ImageNet) work too; at 32x32 it is the
    entry's 4x4 max pool.
    """

    def __init__(self, num_classes: int, width: int = 64, output_scale: float = 0.125):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"ResNet9 width must be a positive int, got {width!r}")
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        self.output_scale = float(output_scale)
        self.features = nn.Sequential(
            _conv_bn_relu(3, c1),
            _conv_bn_relu(c1, c2), nn.MaxPool2d(2), Residual(c2),
            _conv_bn_relu(c2, c3), nn.MaxPool2d(2),
            _conv_bn_relu(c3, c4), nn.MaxPool2d(2), Residual(c4),
            nn.AdaptiveMaxPool2d(1),
        )
        self.classifier = nn.Linear(c4, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1)) * self.output_scale


@register("resnet9")
def resnet9(num_classes: int, width: int = 64, output_scale: float = 0.125) -> nn.Module:
    """DAWNBench ResNet-9 for 32x32 inputs; see `ResNet9` for the arguments."""
    return ResNet9(num_classes, width=width, output_scale=output_scale)
