"""Tests for models/: parameter counts against hand-computed and published figures,
forward shapes in both memory formats, the registry, and seeded determinism."""

import pytest
import torch
import torch.nn as nn

from models import available_models, build_model, register
from models.preresnet import PreActBasicBlock, PreActBottleneck, PreResNet
from models.wide_resnet import WideResNet


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# Hand-computed parameter counts, from the layer shapes the papers describe.
# conv kxk: k*k*cin*cout (+cout if biased); BN: 2*c; linear: cin*cout (+cout).

def resnet9_count(width: int, num_classes: int) -> int:
    w = width
    convs = [(3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w),
             (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w)]
    return sum(9 * ci * co + 2 * co for ci, co in convs) + 8 * w * num_classes


def preresnet_count(depth: int, bottleneck: bool, num_classes: int) -> int:
    n = (depth - 2) // (9 if bottleneck else 6)
    total = 9 * 3 * 16  # stem conv
    cin = 16
    for c in (16, 32, 64):
        for i in range(n):
            if bottleneck:
                cout = 4 * c
                total += 2 * cin + cin * c + 2 * c + 9 * c * c + 2 * c + c * cout
            else:
                cout = c
                total += 2 * cin + 9 * cin * c + 2 * c + 9 * c * c
            if i == 0 and cin != cout:
                total += cin * cout  # 1x1 projection shortcut
            cin = cout
    return total + 2 * cin + cin * num_classes + num_classes


def vgg16_count(num_classes: int, batch_norm: bool) -> int:
    layout = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, cin = 0, 3
    for cout in layout:
        total += 9 * cin * cout + cout + (2 * cout if batch_norm else 0)
        cin = cout
    return total + 2 * (512 * 512 + 512) + 512 * num_classes + num_classes


def wrn_count(depth: int, k: int, num_classes: int) -> int:
    n = (depth - 4) // 6
    total, cin = 9 * 3 * 16, 16
    for c in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            total += 2 * cin + 9 * cin * c + 2 * c + 9 * c * c
            if i == 0:
                total += cin * c  # every stage of WRN-28-10 changes width
            cin = c
    return total + 2 * cin + cin * num_classes + num_classes


# ---------------------------------------------------------------------------
# Parameter counts

@pytest.mark.parametrize("width, stack_md_millions", [(16, 0.41), (32, 1.65), (64, 6.57)])
def test_resnet9_param_count_matches_hand_count_and_stack_md(width, stack_md_millions):
    n = count_params(build_model("resnet9", 10, width=width))
    assert n == resnet9_count(width, 10)
    assert round(n / 1e6, 2) == stack_md_millions


@pytest.mark.parametrize("name, depth, bottleneck, hand_count, published", [
    ("preresnet110", 110, False, 1_730_522, 1.73e6),
    ("preresnet164", 164, True, 1_703_258, 1.70e6),
])
def test_preresnet_param_count(name, depth, bottleneck, hand_count, published):
    assert preresnet_count(depth, bottleneck, 10) == hand_count
    n = count_params(build_model(name, 10))
    assert n == hand_count
    assert abs(n - published) / published < 0.02


@pytest.mark.parametrize("name, depth", [("preresnet110", 110), ("preresnet164", 164)])
def test_preresnet_depth_counts_weight_layers(name, depth):
    model = build_model(name, 10)
    # Depth counts the stem conv, the block convs and the classifier, not shortcuts.
    convs = [m for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not n.endswith("shortcut")]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth


@pytest.mark.parametrize("name, batch_norm", [("vgg16", False), ("vgg16_bn", True)])
def test_vgg16_param_count_matches_layer_shapes(name, batch_norm):
    model = build_model(name, 10)
    assert count_params(model) == vgg16_count(10, batch_norm)
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weight_layers) == 16


def test_vgg16_without_bn_is_about_15_25_million():
    assert round(vgg16_count(10, batch_norm=False) / 1e6, 2) == 15.25


def test_wrn28_10_param_count():
    n = count_params(build_model("wrn28_10", 10))
    assert n == wrn_count(28, 10, 10)
    assert round(n / 1e6, 2) == 36.48  # WRN paper: 36.5 M
    assert round(n / 1e6, 1) == 36.5


@pytest.mark.parametrize("name, published", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_torchvision_resnet_param_counts(name, published):
    # Published: 11.69 M and 25.56 M at 1000 classes (torchvision model table).
    assert count_params(build_model(name, 1000)) == published
    fc_in = 512 if name == "resnet18" else 2048
    # Small stem: 3x3 instead of 7x7 kernel on 3 -> 64 channels; head shrinks to 10.
    expected_small = published - 64 * 3 * (49 - 9) - (fc_in + 1) * (1000 - 10)
    small = build_model(name, 10, small_input=True)
    assert count_params(small) == expected_small
    assert isinstance(small.maxpool, nn.Identity)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)


# ---------------------------------------------------------------------------
# Forward passes at the input size each model is meant for

# name -> (kwargs, input side in pixels, batch). ResNet-50 at 224 took 2.6 s a
# forward on these 2 cores (> the 2 s budget), so its default stem runs at 64.
FORWARD_CASES = {
    "resnet9": [({}, 32, 2)],
    "preresnet110": [({}, 32, 2)],
    "preresnet164": [({}, 32, 2)],
    "vgg16": [({}, 32, 2)],
    "vgg16_bn": [({}, 32, 2)],
    "wrn28_10": [({}, 32, 1)],
    "resnet18": [({"small_input": True}, 64, 2), ({}, 224, 1)],
    "resnet50": [({"small_input": True}, 64, 1), ({}, 64, 1)],
}


def test_every_registered_model_has_a_forward_case():
    assert sorted(FORWARD_CASES) == available_models()


@pytest.mark.parametrize("name, kwargs, side, batch", [
    (name, kw, side, batch) for name, cases in FORWARD_CASES.items()
    for kw, side, batch in cases])
def test_forward_shape_channels_last(name, kwargs, side, batch):
    num_classes = 7  # not 10, so a hard-wired head size would show
    torch.manual_seed(0)
    model = build_model(name, num_classes, **kwargs).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, side, side).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (batch, num_classes)
    assert torch.isfinite(y).all()


# Cheap stand-ins for every model file, so both formats can run without the cost.
SMALL_MODELS = {
    "resnet9_w16": lambda: build_model("resnet9", 5, width=16),
    "preresnet_basic_n1": lambda: PreResNet(5, PreActBasicBlock, blocks_per_stage=1),
    "preresnet_bottleneck_n1": lambda: PreResNet(5, PreActBottleneck, blocks_per_stage=1),
    "vgg16_bn": lambda: build_model("vgg16_bn", 5),
    "wrn10_2": lambda: WideResNet(5, depth=10, widen_factor=2),
    "resnet18_small": lambda: build_model("resnet18", 5, small_input=True),
}


@pytest.mark.parametrize("key", sorted(SMALL_MODELS))
def test_channels_last_output_matches_contiguous(key):
    torch.manual_seed(0)
    model = SMALL_MODELS[key]().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y_nchw = model(x)
        model = model.to(memory_format=torch.channels_last)
        y_nhwc = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_nhwc, y_nchw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", sorted(SMALL_MODELS))
def test_every_parameter_gets_a_gradient(key):
    torch.manual_seed(0)
    model = SMALL_MODELS[key]().train()
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_resnet9_logits_are_scaled_by_one_eighth():
    torch.manual_seed(0)
    model = build_model("resnet9", 10, width=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.features(x).amax(dim=(2, 3))  # global max pool by hand
        expected = 0.125 * (features @ model.classifier.weight.T)
        torch.testing.assert_close(model(x), expected)


def test_projection_shortcut_inputs_follow_the_papers():
    # With the residual branch's last conv zeroed, a block outputs its shortcut
    # alone: WRN projects the pre-activated input, the SWA/SWALP PreResNet the raw one.
    torch.manual_seed(0)
    wrn_block = WideResNet(5, depth=10, widen_factor=2).layer2[0].eval()
    pre_block = PreResNet(5, PreActBasicBlock, blocks_per_stage=1).layer2[0].eval()
    with torch.no_grad():
        for block in (wrn_block, pre_block):
            block.bn1.running_mean.uniform_(-1, 1)  # so BN-ReLU is not a no-op
            block.conv2.weight.zero_()
        x = torch.randn(2, wrn_block.bn1.num_features, 8, 8)
        torch.testing.assert_close(
            wrn_block(x), wrn_block.shortcut(torch.relu(wrn_block.bn1(x))))
        x = torch.randn(2, pre_block.bn1.num_features, 8, 8)
        torch.testing.assert_close(pre_block(x), pre_block.shortcut(x))


def test_wrn_dropout_kwarg_reaches_every_block():
    model = build_model("wrn28_10", 10, dropout=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.3] * 12


# ---------------------------------------------------------------------------
# Registry and determinism

def test_available_models_lists_spec_models():
    assert available_models() == sorted([
        "resnet9", "preresnet110", "preresnet164", "vgg16", "vgg16_bn",
        "wrn28_10", "resnet18", "resnet50"])


def test_unknown_name_raises_value_error_listing_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet10", 10)
    message = str(info.value)
    assert "resnet10" in message
    for name in available_models():
        assert name in message


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True])
def test_bad_num_classes_raises(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet9", num_classes, width=16)


def test_unknown_kwarg_raises_type_error():
    with pytest.raises(TypeError, match="small_input"):
        build_model("resnet9", 10, small_input=True)


def test_register_rejects_a_taken_name():
    with pytest.raises(ValueError, match="resnet9"):
        register("resnet9")(lambda num_classes: nn.Linear(1, num_classes))


@pytest.mark.parametrize("name, kwargs", [
    ("resnet9", {"width": 16}), ("preresnet110", {}), ("vgg16", {}),
    ("resnet18", {"small_input": True}),
])
def test_same_seed_gives_identical_weights(name, kwargs):
    def build(seed):
        torch.manual_seed(seed)
        return build_model(name, 10, **kwargs).state_dict()

    first, second, other = build(0), build(0), build(1)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # The check above could pass vacuously if init ignored the RNG.
    assert any(not torch.equal(first[k], other[k]) for k in first
               if first[k].is_floating_point())


def test_same_seed_gives_identical_weights_wrn():
    def build(seed):
        torch.manual_seed(seed)
        return WideResNet(10, depth=10, widen_factor=2).state_dict()

    first, second = build(0), build(0)
    assert all(torch.equal(first[k], second[k]) for k in first)
