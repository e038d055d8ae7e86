"""swa_lib.quant in training: QuantizedSGD and the activation/error quantizers.

Oracles: plain torch.optim.SGD (bitwise, with quantization off), the SWALP official
order of operations written out by hand, and the format's grid.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant_helpers import SMALL_NEAREST, assert_on_grid, gen
from swa_lib.quant import BlockFloat, QuantizedSGD, insert_quantizers, quantize, quantizers_disabled, remove_quantizers

# ---------------------------------------------------------------- QuantizedSGD

def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def batches(count: int):
    g = gen(13)
    return [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 5, (8,), generator=g))
            for _ in range(count)]


def backward(model: nn.Module, batch) -> None:
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()


@pytest.mark.parametrize("nesterov", [False, True])
def test_quantized_sgd_with_all_formats_none_is_bitwise_plain_sgd(nesterov):
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    plain_model, wrapped_model = tiny_net(0), tiny_net(0)
    plain = torch.optim.SGD(plain_model.parameters(), **kwargs)
    wrapped = QuantizedSGD(torch.optim.SGD(wrapped_model.parameters(), **kwargs))
    for batch in batches(5):
        for model, optimizer in ((plain_model, plain), (wrapped_model, wrapped)):
            backward(model, batch)
            optimizer.step()
    for p, w in zip(plain_model.parameters(), wrapped_model.parameters(), strict=True):
        assert torch.equal(p, w)
        assert torch.equal(plain.state[p]["momentum_buffer"], wrapped.state[w]["momentum_buffer"])


def test_quantized_sgd_follows_swalp_order_of_operations():
    # Different word lengths per kind, so a swapped format shows. Nearest: deterministic.
    fmt = {k: BlockFloat(wl, "small", "nearest") for k, wl in
           (("weight", 6), ("grad", 5), ("momentum", 7), ("acc", 10))}
    lr, mu, wd = 0.1, 0.9, 5e-4
    model = tiny_net(1)
    optimizer = QuantizedSGD(torch.optim.SGD(model.parameters(), lr=lr, momentum=mu,
                                             weight_decay=wd),
                             fmt["weight"], fmt["grad"], fmt["momentum"], fmt["acc"])
    params = list(model.parameters())
    acc = [p.detach().clone() for p in params]  # official: accumulator starts as the weights
    buf = [None] * len(params)
    for batch in batches(3):
        backward(model, batch)
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        for i, p in enumerate(params):
            g = quantize(grads[i], fmt["grad"])           # 1. quantize the gradient
            d = g.add(acc[i], alpha=wd)                   # 3. SGD on the accumulator
            buf[i] = d.clone() if buf[i] is None else buf[i].mul(mu).add(d)
            acc[i] = quantize(acc[i].add(buf[i], alpha=-lr), fmt["acc"])  # 4.
            buf[i] = quantize(buf[i], fmt["momentum"])    # 5.
            assert torch.equal(p.grad, g)
            assert torch.equal(optimizer.state[p]["weight_accumulator"], acc[i])
            assert torch.equal(p, quantize(acc[i], fmt["weight"]))
            assert torch.equal(optimizer.state[p]["momentum_buffer"], buf[i])


def test_quantized_sgd_weights_lie_on_the_weight_grid_after_a_step():
    f8 = BlockFloat(8, "small", "stochastic")
    acc_fmt = BlockFloat(12, "small", "stochastic")
    model = tiny_net(2)
    optimizer = QuantizedSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                             f8, f8, f8, acc_fmt, generator=gen(14))
    for batch in batches(2):
        backward(model, batch)
        optimizer.step()
    for p in model.parameters():
        accumulator = optimizer.state[p]["weight_accumulator"]
        assert_on_grid(p.detach(), accumulator, f8)
        assert torch.equal(quantize(accumulator, acc_fmt, gen(15)), accumulator)


def test_quantized_sgd_weights_equal_accumulator_when_their_formats_are_equal():
    # The official scripts use wl 8 for both: Q_weight(Q_acc(a)) = Q_acc(a).
    f8 = BlockFloat(8, "small", "stochastic")
    model = tiny_net(10)
    optimizer = QuantizedSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                             f8, f8, f8, f8, generator=gen(17))
    backward(model, batches(1)[0])
    optimizer.step()
    for p in model.parameters():
        assert torch.equal(p, optimizer.state[p]["weight_accumulator"])
        assert torch.equal(quantize(p.detach(), f8, gen(18)), p)


def test_quantized_sgd_state_dict_round_trip_continues_identically():
    f = BlockFloat(8, "small", "nearest")

    def make(model):
        return QuantizedSGD(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
            f, f, f, BlockFloat(16, "small", "nearest"))
    data = batches(3)
    model_a = tiny_net(3)
    optimizer_a = make(model_a)
    for batch in data[:2]:
        backward(model_a, batch)
        optimizer_a.step()
    saved = copy.deepcopy((model_a.state_dict(), optimizer_a.state_dict()))
    assert "weight_accumulator" in saved[1]["state"][0]
    model_b = tiny_net(4)
    optimizer_b = make(model_b)
    model_b.load_state_dict(saved[0])
    optimizer_b.load_state_dict(saved[1])
    for model, optimizer in ((model_a, optimizer_a), (model_b, optimizer_b)):
        backward(model, data[2])
        optimizer.step()
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer_a.state[p]["weight_accumulator"],
                           optimizer_b.state[q]["weight_accumulator"])


def test_lr_scheduler_on_the_wrapper_drives_the_wrapped_sgd():
    model = tiny_net(8)
    optimizer = QuantizedSGD(torch.optim.SGD(model.parameters(), lr=0.1), SMALL_NEAREST)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    backward(model, batches(1)[0])
    optimizer.step()
    scheduler.step()
    assert optimizer.optimizer.param_groups[0]["lr"] == 0.05


# ---------------------------------------------------------------- activation / error quantizers

def test_activation_on_act_grid_forward_and_error_on_err_grid_backward():
    fmt_act, fmt_err = BlockFloat(6, "small", "nearest"), BlockFloat(5, "small", "nearest")
    model = tiny_net(5)
    insert_quantizers(model, fmt_act, fmt_err)
    seen = {}
    flatten, linear = model[3], model[4]
    def before_quantizer(m, args, out):
        seen["raw_act"] = out.detach().clone()
        out.register_hook(lambda g: seen.__setitem__("quantized_err", g.clone()))

    def after_quantizer(m, args):  # registered after insert_quantizers: sees its output
        seen["quantized_act"] = args[0].detach().clone()
        args[0].register_hook(lambda g: seen.__setitem__("raw_err", g.clone()))
    flatten.register_forward_hook(before_quantizer)
    linear.register_forward_pre_hook(after_quantizer)
    backward(model, batches(1)[0])
    assert torch.equal(seen["quantized_act"], quantize(seen["raw_act"], fmt_act))
    assert_on_grid(seen["quantized_act"], seen["raw_act"], fmt_act)
    assert torch.equal(seen["quantized_err"], quantize(seen["raw_err"], fmt_err))
    assert_on_grid(seen["quantized_err"], seen["raw_err"], fmt_err)
    assert not torch.equal(seen["quantized_err"], seen["raw_err"])


def test_output_quantizers_put_conv_outputs_and_their_errors_on_the_grid():
    fmt_act, fmt_err = BlockFloat(6, "big", "nearest"), BlockFloat(5, "big", "nearest")
    model = tiny_net(9)
    conv, norm = model[0], model[1]
    seen = {}

    def raw_output(m, args, out):  # registered first: sees the conv's own output
        seen["raw_act"] = out.detach().clone()
        out.register_hook(lambda g: seen.__setitem__("quantized_err", g.clone()))

    def quantized_output(m, args):
        seen["quantized_act"] = args[0].detach().clone()
        args[0].register_hook(lambda g: seen.__setitem__("raw_err", g.clone()))
    conv.register_forward_hook(raw_output)
    norm.register_forward_pre_hook(quantized_output)
    insert_quantizers(model, fmt_act, fmt_err, outputs=True)
    backward(model, batches(1)[0])
    assert torch.equal(seen["quantized_act"], quantize(seen["raw_act"], fmt_act))
    assert torch.equal(seen["quantized_err"], quantize(seen["raw_err"], fmt_err))
    assert not torch.equal(seen["quantized_err"], seen["raw_err"])
    remove_quantizers(model)
    assert len(conv._forward_hooks) == 1 and len(conv._forward_pre_hooks) == 0  # ours gone


def test_switching_quantizers_off_gives_the_exact_float_model():
    plain = tiny_net(6)
    quantized = insert_quantizers(copy.deepcopy(plain), BlockFloat(4, "big", "stochastic"),
                                  BlockFloat(4, "big", "stochastic"), generator=gen(16))
    x, y = batches(1)[0]
    for model in (plain, quantized):
        model.eval()
    expected = plain(x)
    with quantizers_disabled(quantized):
        assert torch.equal(quantized(x), expected)
        averaged = copy.deepcopy(quantized)  # e.g. torch.optim.swa_utils.AveragedModel
    assert not torch.equal(quantized(x), expected)  # back on after the block
    with quantizers_disabled(averaged):
        assert torch.equal(averaged(x), expected)
    assert quantized.state_dict().keys() == plain.state_dict().keys()
    remove_quantizers(averaged)
    assert torch.equal(averaged(x), expected)
    assert not any("quantizer" in name for name, _ in averaged.named_modules())


def test_insert_quantizers_skips_excluded_layers_and_refuses_to_insert_twice():
    model = insert_quantizers(tiny_net(7), SMALL_NEAREST, None, exclude=("0",))
    assert not hasattr(model[0], "input_quantizer") and hasattr(model[4], "input_quantizer")
    with pytest.raises(RuntimeError, match="already has"):
        insert_quantizers(model, SMALL_NEAREST, None)
    with pytest.raises(ValueError, match="not modules"):
        insert_quantizers(tiny_net(7), SMALL_NEAREST, None, exclude=("conv1",))
