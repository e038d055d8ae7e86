"""VGG16 for CIFAR, with and without BatchNorm, as in the SWA and SWALP code.

13 3x3 convs (with bias) in the configuration below, each followed by [BN] and
ReLU, with 2x2 max pools that bring 32x32 down to 1x1; then
Dropout-Linear(512,512)-ReLU-Dropout-Linear(512,512)-ReLU-Linear(512,num_classes).
SWALP's VGG16 results (SPEC section 2) are for the variant without BN.
"""

import torch
import torch.nn as nn

from models.registry import register

# Conv output channels; "M" is a 2x2 max pool.
VGG16_LAYOUT: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
    512, 512, 512, "M", 512, 512, 512, "M",
]


class VGG(nn.Module):
    """CIFAR VGG.

    Args:
        num_classes: output size.
        layout: conv widths and "M" pools; the last conv must have 512 channels.
        batch_norm: put BatchNorm2d after every conv.
        dropout: drop probability of the two classifier dropouts (0.5 in the papers).

    Init as in the SWA/SWALP code: conv weights N(0, 2 / (k*k*out_channels))
    (Kaiming, fan-out), conv biases 0; linear layers and BN use PyTorch's default.
    The features end at 1x1 only for 32x32 inputs, which this network is meant for.
    """

    def __init__(self, num_classes: int, layout: list[int | str] = VGG16_LAYOUT,
                 batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(in_channels, item, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            in_channels = item
        if in_channels != 512:
            raise ValueError(f"VGG layout must end with 512 channels, got {in_channels}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten, not view: a channels_last 1x1 map is not view-compatible in general.
        return self.classifier(torch.flatten(self.features(x), 1))


@register("vgg16")
def vgg16(num_classes: int, dropout: float = 0.5) -> nn.Module:
    """CIFAR VGG16 without BatchNorm (SWALP's VGG16), for 32x32 inputs."""
    return VGG(num_classes, VGG16_LAYOUT, batch_norm=False, dropout=dropout)


@register("vgg16_bn")
def vgg16_bn(num_classes: int, dropout: float = 0.5) -> nn.Module:
    """CIFAR VGG16 with BatchNorm after every conv, for 32x32 inputs."""
    return VGG(num_classes, VGG16_LAYOUT, batch_norm=True, dropout=dropout)
