"""Where a model's activations (forward) and errors (backward) are quantized: named placements.

  layer_inputs  the input of every Conv2d and Linear: works for any model, and is what
                `insert_quantizers` does. It quantizes the image, shortcut-conv inputs and
                the classifier input too, which the official SWALP models do not.
  relu_outputs  the output of every nn.ReLU (each call of a shared one): generic, and
                for a conv-BN-ReLU network such as ResNet-9 the analogue of the official
                VGG placement. The image stays full precision; the sum of a residual
                branch is not quantized itself (both of its terms already are).
  official      the official SWALP models (stevenygd/SWALP, models/vgg_low.py and
                models/preresnet_low.py), for our VGG16 and PreResNet:
                - VGG16 (with or without BN): after every ReLU, the 13 of the conv stack
                  and the 2 of the classifier; not the image, not the logits;
                - PreResNet: the stem conv's output, and inside every block the input
                  (after BN-ReLU) and the output of each of its convs; not the image, the
                  shortcut conv or the input of the final FC layer.
"""

import torch
import torch.nn as nn

from swa_lib.quant.modules import insert_quantizers_at
from swa_lib.quant.number import BlockFloat

PLACEMENTS = ("layer_inputs", "relu_outputs", "official")
# Model names (models.available_models()) that have an official placement.
OFFICIAL_PLACEMENT_MODELS = ("vgg16", "vgg16_bn", "preresnet110", "preresnet164")


def placement_points(model: nn.Module, placement: str) -> tuple[list[str], list[str]]:
    """The module names whose input, and those whose output, `placement` quantizes."""
    from models.preresnet import PreActBasicBlock, PreActBottleneck, PreResNet
    from models.vgg import VGG

    named = list(model.named_modules())
    if placement == "layer_inputs":
        return [n for n, m in named if isinstance(m, (nn.Conv2d, nn.Linear))], []
    if placement == "relu_outputs" or (placement == "official" and isinstance(model, VGG)):
        return [], [n for n, m in named if isinstance(m, nn.ReLU)]
    if placement == "official" and isinstance(model, PreResNet):
        inputs, outputs = [], ["conv1"]
        for name, block in named:
            if isinstance(block, (PreActBasicBlock, PreActBottleneck)):
                convs = [f"{name}.{child}" for child, m in block.named_children()
                         if isinstance(m, nn.Conv2d) and child != "shortcut"]
                inputs += convs
                outputs += convs
        return inputs, outputs
    if placement == "official":
        raise ValueError(f"quant placement 'official' is defined for {', '.join(OFFICIAL_PLACEMENT_MODELS)} "
                         f"only, not for {type(model).__name__}; use layer_inputs or relu_outputs")
    raise ValueError(f"quant placement {placement!r} is not one of {', '.join(PLACEMENTS)}")


def insert_quantizers_by_placement(model: nn.Module, placement: str, fmt_act: BlockFloat | None,
                                   fmt_err: BlockFloat | None,
                                   generator: torch.Generator | None = None,
                                   fused: bool = False) -> nn.Module:
    """Put activation / error quantizers into `model` (in place) where `placement` says."""
    inputs, outputs = placement_points(model, placement)
    return insert_quantizers_at(model, fmt_act, fmt_err, inputs=inputs, outputs=outputs,
                                generator=generator, fused=fused)
