"""ImageNet-style ResNet-18/50 from torchvision, with an optional small-input stem.

SWAP's ImageNet runs use ResNet-50; ResNet-18 is the cheaper stand-in. The
networks come from `torchvision.models` (untrained, `weights=None`), so their
structure and init are torchvision's: Kaiming-normal fan-out convs, BN weight 1
and bias 0.
"""

import torch.nn as nn
import torchvision

from models.registry import register


def _build(arch: str, num_classes: int, small_input: bool, zero_init_residual: bool) -> nn.Module:
    """A torchvision ResNet, untrained.

    Args:
        arch: torchvision.models name ("resnet18", "resnet50").
        num_classes: output size.
        small_input: for 32x32/64x64 inputs, replace the 7x7 stride-2 stem conv and the
            max pool with one 3x3 stride-1 conv and no pool (the usual CIFAR adaptation).
            Default False: the ImageNet network, for 224x224 inputs.
        zero_init_residual: zero each block's last BN weight (torchvision option; off by default).
    """
    model = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if small_input:
        # 32x32 or 64x64 inputs: the 7x7/2 stem plus the max pool would shrink a
        # CIFAR image to 8x8 before the first block, so use a 3x3/1 conv and no pool.
        stem = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1,
                         padding=1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = stem
        model.maxpool = nn.Identity()
    return model


@register("resnet18")
def resnet18(num_classes: int, small_input: bool = False, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet-18 (11.69 M params at 1000 classes); arguments as in `_build`."""
    return _build("resnet18", num_classes, small_input, zero_init_residual)


@register("resnet50")
def resnet50(num_classes: int, small_input: bool = False, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet-50 (25.56 M params at 1000 classes); arguments as in `_build`."""
    return _build("resnet50", num_classes, small_input, zero_init_residual)
