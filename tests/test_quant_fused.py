"""quantize(..., fused=True), the torch.compile'd quantizer: what the shared format
tests in test_quant_format.py do not cover.

Oracles: the eager quantize (nearest rounding must agree bit for bit), the same fused
function run uncompiled (the compiler must not change a bit), Hoeffding bounds on the
noise bits, and training steps of the eager quantizer.
"""
import copy
import importlib
import math

import pytest
import torch
import torch.nn as nn

from quant_helpers import ALL_FORMATS, gen, varied_tensor
from swa_lib.quant import BlockFloat, QuantizedSGD, fused_rounding_bits, insert_quantizers, quantize
from swa_lib.quant.fused import quantize_fused


def extreme_tensor(dtype) -> torch.Tensor:
    """Rows that exercise every branch: ordinary, tiny (the up-shift), the top of the
    dtype (the down-shift), all zero, a -2^E minimum, and a subnormal block maximum."""
    emax, subnormal = {torch.float64: (1023, -1040)}.get(dtype, (127, -130))
    x = varied_tensor((6, 40), seed=20).to(dtype)
    x[1] = x[1] / x[1].abs().max() * 2.0 ** -120
    x[2] = x[2] / x[2].abs().max() * 2.0 ** emax if dtype != torch.bfloat16 else x[2]
    x[3] = 0.0
    x[4] = x[4] / x[4].abs().max()
    x[4, 0] = -2.0
    x[5] = x[5] / x[5].abs().max() * 2.0 ** subnormal
    assert x[5].abs().max() > 0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_compiled_kernel_equals_the_same_function_run_eagerly(fmt, dtype):
    for x in (extreme_tensor(dtype), varied_tensor((8, 3, 3, 3), seed=21).to(dtype),
              torch.randn(50, generator=gen(22)).to(dtype)):
        for wl in (3, 8, 16, 40, 64):
            f = BlockFloat(wl, fmt.block, fmt.rounding)
            compiled = quantize_fused(x, f, gen(23))
            eager = quantize_fused(x, f, gen(23), compiled=False)
            assert compiled.dtype == x.dtype and compiled.shape == x.shape
            assert torch.equal(compiled, eager), (f, dtype, tuple(x.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", ["small", "big"])
def test_nearest_rounding_is_bitwise_the_eager_quantizer(block, dtype):
    for wl in (2, 4, 8, 24):
        fmt = BlockFloat(wl, block, "nearest")
        for x in (extreme_tensor(dtype), varied_tensor((16, 2, 3), seed=24).to(dtype)):
            assert torch.equal(quantize(x, fmt, fused=True), quantize(x, fmt))


@pytest.mark.parametrize("block", ["small", "big"])
def test_channels_last_input_keeps_its_layout_and_the_same_blocks(block, monkeypatch):
    x = varied_tensor((4, 3, 5, 6), seed=30).contiguous(memory_format=torch.channels_last)
    nearest = BlockFloat(8, block, "nearest")
    q = quantize(x, nearest, fused=True)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q, quantize(x.contiguous(), nearest))
    # Stochastic: the noise follows memory order, (N, H, W, C).
    stochastic = BlockFloat(8, block, "stochastic")
    q = quantize(x, stochastic, gen(31), fused=True)
    bits = fused_rounding_bits((4, 5, 6, 3), gen(31)).permute(0, 3, 1, 2).contiguous()
    # The oracle: the eager quantize (NCHW-contiguous input) with its noise draw
    # replaced by those bits.
    eager = importlib.import_module("swa_lib.quant.quantize")
    monkeypatch.setattr(eager, "rounding_bits", lambda shape, generator, device: bits)
    assert torch.equal(q, quantize(x.contiguous(), stochastic, gen(0)))


def test_noise_bits_are_balanced_and_differ_between_calls():
    # Each of the 24 bits over n elements is a mean of Bernoulli(1/2) draws; Hoeffding:
    # P(|mean - 1/2| >= t) <= 2 exp(-2 n t^2) = 1e-12 for the t below (t = 0.0051).
    n = 1 << 20
    g = gen(25)
    first = fused_rounding_bits((n,), g).long()
    tolerance = math.sqrt(math.log(2 / 1e-12) / (2 * n))
    for bit in range(24):
        mean = ((first >> bit) & 1).double().mean().item()
        assert abs(mean - 0.5) <= tolerance, (bit, mean)
    assert first.min() >= 0 and first.max() < 1 << 24
    # Consecutive elements are uncorrelated (the sample correlation of independent
    # values has standard deviation 1/sqrt(n); 8 of those is a loose bound).
    u = first.double() / (1 << 24) - 0.5
    correlation = (u[1:] * u[:-1]).mean() / u.var()
    assert abs(correlation.item()) < 8 / math.sqrt(n)
    # A second call draws a new seed: the noise is not a copy or a shift of the first.
    second = fused_rounding_bits((n,), g).long()
    assert (first == second).double().mean() < 1e-3
    for shift in range(1, 4):
        assert (first[shift:] == second[:-shift]).double().mean() < 1e-3
    # The same generator state replays the same noise.
    assert torch.equal(fused_rounding_bits((n,), gen(25)).long(), first)


def test_rejects_more_elements_than_int32_indices():
    x = torch.zeros(1).expand(1 << 31)  # no memory: only numel matters, checked first
    with pytest.raises(ValueError, match="at most 2147483647 elements"):
        quantize(x, BlockFloat(8, "big", "nearest"), fused=True)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 5))


def test_training_with_nearest_rounding_is_bitwise_the_eager_training():
    # Quantized activations, errors, gradients, momentum, accumulator and weights.
    fmt = BlockFloat(8, "small", "nearest")
    big = BlockFloat(8, "big", "nearest")
    runs = []
    for fused in (False, True):
        model = insert_quantizers(small_net(), big, big, fused=fused)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt = QuantizedSGD(sgd, fmt_weight=fmt, fmt_grad=fmt, fmt_momentum=fmt, fmt_acc=fmt,
                           fused=fused)
        g = gen(26)
        for _ in range(3):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_stochastic_training_is_reproducible_from_the_generator():
    fmt = BlockFloat(8, "small", "stochastic")
    results = []
    for _ in range(2):
        model = insert_quantizers(small_net(), BlockFloat(8, "big", "stochastic"), None,
                                  generator=gen(27), fused=True)
        opt = QuantizedSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           fmt_weight=fmt, fmt_grad=fmt, fmt_momentum=fmt, fmt_acc=fmt,
                           generator=gen(28), fused=True)
        x, y = torch.randn(4, 3, 8, 8, generator=gen(29)), torch.tensor([0, 1, 2, 3])
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        results.append(model[0].weight.detach().clone())
    assert torch.equal(results[0], results[1])
    assert results[0].unique().numel() > 1
