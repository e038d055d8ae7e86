"""Named quantizer placements against hand-written lists of quantization points per model."""
import pytest
import torch
import torch.nn as nn

import models
from models.preresnet import PreActBasicBlock, PreActBottleneck, PreResNet
from swa_lib.config import ConfigError, load_config
from swa_lib.quant import BlockFloat, insert_quantizers_by_placement, quantization_points, quantize

COARSE = BlockFloat(4, "big", "nearest")  # few grid points: a value off the grid is easy to see


def out(*names):
    return [(n, "output") for n in names]


def in_out(*names):
    return [(n, w) for n in names for w in ("input", "output")]


# models/vgg.py VGG16 without BN: features = conv, ReLU (x2), pool, ... ; classifier =
# Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear. Official: after every ReLU.
VGG16_OFFICIAL = out("features.1", "features.3", "features.6", "features.8", "features.11",
                     "features.13", "features.15", "features.18", "features.20", "features.22",
                     "features.25", "features.27", "features.29", "classifier.2", "classifier.5")
# PreResNet, one bottleneck block per stage: stem output, then each block conv's input and output;
# not the image, the shortcut convs or the fc input.
PRERESNET_BOTTLENECK_OFFICIAL = out("conv1") + in_out(
    "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3",
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3",
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3")
PRERESNET_BASIC_OFFICIAL = out("conv1") + in_out(
    "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2")
# models/resnet9.py: features.{0,1,4,6} are conv-BN-ReLU, features.{3,8} residuals of two of them.
RESNET9_RELU_OUTPUTS = out("features.0.2", "features.1.2", "features.3.body.0.2", "features.3.body.1.2",
                           "features.4.2", "features.6.2", "features.8.body.0.2", "features.8.body.1.2")
VGG16_LAYER_INPUTS = [(f"features.{i}", "input") for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + \
                     [(f"classifier.{i}", "input") for i in (1, 4, 6)]

CASES = {
    "vgg16 official": (lambda: models.build_model("vgg16", 10), "official", VGG16_OFFICIAL),
    "vgg16 layer_inputs": (lambda: models.build_model("vgg16", 10), "layer_inputs", VGG16_LAYER_INPUTS),
    "preresnet bottleneck official": (lambda: PreResNet(10, PreActBottleneck, 1), "official",
                                      PRERESNET_BOTTLENECK_OFFICIAL),
    "preresnet basic official": (lambda: PreResNet(10, PreActBasicBlock, 1), "official", PRERESNET_BASIC_OFFICIAL),
    "resnet9 relu_outputs": (lambda: models.build_model("resnet9", 10, width=4), "relu_outputs",
                             RESNET9_RELU_OUTPUTS),
}
# Points that must stay full precision: the image, the logits, PreResNet's fc input, a shortcut
# conv's input that is a residual sum.
NEVER = {
    # The last Linear's input is the quantized output of the classifier's second ReLU, as in
    # the official VGG16LP (which quantizes after that ReLU).
    "vgg16 official": [("features.0", "input"), ("classifier.6", "output")],
    "vgg16 layer_inputs": [("classifier.6", "output")],
    "preresnet bottleneck official": [("conv1", "input"), ("fc", "input"), ("layer3.0.shortcut", "input")],
    "preresnet basic official": [("conv1", "input"), ("fc", "input"), ("layer3.0.shortcut", "input")],
    "resnet9 relu_outputs": [("features.0.0", "input"), ("classifier", "output")],
}


def seen_values(model: nn.Module, x: torch.Tensor) -> dict:
    """(name, input|output) -> tensors seen there in one forward, by hooks registered after the
    quantizers' own (so they see quantized values)."""
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU)):
            m.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault((n, "input"), []).append(a[0].clone()))
            m.register_forward_hook(lambda m, a, o, n=name: seen.setdefault((n, "output"), []).append(o.clone()))
    with torch.no_grad():
        model.eval()(x)
    return seen


def on_grid(tensors) -> bool:
    return all(torch.equal(quantize(t, COARSE), t) for t in tensors)


@pytest.mark.parametrize("case", sorted(CASES))
def test_placement_quantizes_exactly_the_listed_points(case):
    build, placement, expected = CASES[case]
    torch.manual_seed(0)
    model = insert_quantizers_by_placement(build(), placement, COARSE, COARSE)
    assert quantization_points(model) == expected
    seen = seen_values(model, torch.randn(2, 3, 32, 32))
    for point in expected:
        assert on_grid(seen[point]), f"{point} should be quantized"
    for point in NEVER[case]:
        assert not on_grid(seen[point]), f"{point} should stay full precision"


def test_preresnet164_official_placement_covers_every_block_conv_and_nothing_else():
    model = insert_quantizers_by_placement(models.build_model("preresnet164", 10), "official", COARSE, COARSE)
    points = quantization_points(model)
    assert len(points) == 1 + 3 * 18 * 3 * 2  # stem output; 54 bottlenecks x 3 convs x in/out
    assert points[:3] == [("conv1", "output"), ("layer1.0.conv1", "input"), ("layer1.0.conv1", "output")]
    assert not [p for p in points if "shortcut" in p[0] or p[0] == "fc"]


def test_official_placement_is_refused_for_models_without_one():
    with pytest.raises(ConfigError, match="method.quant_placement: official is defined for"):
        load_config(None, ["method.name=swalp", "model.name=resnet9", "method.quant_placement=official"])
    with pytest.raises(ConfigError, match="method.quant_placement: 'after_conv' is not one of"):
        load_config(None, ["method.name=swalp", "method.quant_placement=after_conv"])
    with pytest.raises(ValueError, match="official.*ResNet9"):
        insert_quantizers_by_placement(models.build_model("resnet9", 10, width=4), "official", COARSE, COARSE)
