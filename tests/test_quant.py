"""Tests for swa_lib.quant (SWALP block floating point). Each test names its invariant.

Oracles: numbers worked out by hand (written in the tests), the official SWALP
formula re-implemented here in float64, per-block exponents computed with Python's
math.frexp, and plain torch.optim.SGD.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from swa_lib.quant import (BlockFloat, QuantizedSGD, insert_quantizers, quantize,
                           quantizers_disabled, remove_quantizers)

SMALL_NEAREST = BlockFloat(8, "small", "nearest")
ALL_FORMATS = [BlockFloat(8, b, r) for b in ("small", "big") for r in ("nearest", "stochastic")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks_of(x: torch.Tensor, fmt: BlockFloat):
    """The blocks of x as float64 rows (small: one per slice of dim 0 if x.dim() >= 2)."""
    if fmt.block == "small" and x.dim() >= 2:
        return list(x.double().reshape(x.shape[0], -1))
    return [x.double().reshape(-1)]


def reference_exponent(block: torch.Tensor) -> int:
    """floor(log2 max|x|) by math.frexp; one less when the max is -2^E alone."""
    values = block.tolist()
    max_abs = max(abs(v) for v in values)
    mantissa, exponent = math.frexp(max_abs)
    e = exponent - 1
    if mantissa == 0.5 and max(values) < max_abs:
        e -= 1
    return e


def assert_on_grid(q: torch.Tensor, x: torch.Tensor, fmt: BlockFloat) -> None:
    """Each block of q is an integer multiple of 2^(e-wl+2) inside the integer range,
    and within one step of x (half a step for nearest, except a clamped top)."""
    wl = fmt.word_length_bits
    for q_block, x_block in zip(blocks_of(q, fmt), blocks_of(x, fmt)):
        if not x_block.any():
            assert not q_block.any()
            continue
        step = 2.0 ** (reference_exponent(x_block) - wl + 2)
        ints = q_block / step
        assert torch.equal(ints, ints.round()), "values off the grid"
        assert ints.min() >= -2 ** (wl - 1) and ints.max() <= 2 ** (wl - 1) - 1
        error = (q_block - x_block).abs()
        clamped = ints == 2 ** (wl - 1) - 1
        bound = step / 2 if fmt.rounding == "nearest" else step
        assert (error[~clamped] <= bound).all() and (error <= step).all()


def varied_tensor(shape, seed: int) -> torch.Tensor:
    """Normal data whose dim-0 slices span 2^-20 .. 2^20, so blocks differ."""
    g = gen(seed)
    x = torch.randn(shape, generator=g)
    scale = 2.0 ** torch.randint(-20, 21, (shape[0],) + (1,) * (len(shape) - 1), generator=g)
    return x * scale


# ---------------------------------------------------------------- number format

@pytest.mark.parametrize("kwargs, field", [
    ({"word_length_bits": 1}, "word_length_bits=1"),
    ({"word_length_bits": True}, "word_length_bits=True"),
    ({"word_length_bits": 8.0}, "word_length_bits=8.0"),
    ({"block": "medium"}, "block='medium'"),
    ({"rounding": "up"}, "rounding='up'"),
])
def test_block_float_rejects_bad_values_naming_field_value_and_allowed(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        BlockFloat(**kwargs)
    assert "expected" in str(info.value)


# ---------------------------------------------------------------- hand-computed values

# wl 4: integers in [-8, 7]. Row 0 has max 1.9375, e = 0, step 2^(0-4+2) = 0.25.
# Row 1 has max 0.2 = 1.6 * 2^-3, e = -3, step 2^-5 = 0.03125.
HAND_X = [[0.3, -0.7, 1.0, 0.05, 0.375, -0.375, 0.625, 1.9375],
          [0.2, -0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0]]
# Row 0 / 0.25: 1.2->1, -2.8->-3, 4, 0.2->0, 1.5->2 (tie, half up), -1.5->-1 (tie, half
# up; torch.round would give -2), 2.5->3 (tie; torch.round would give 2), 7.75->8->7.
# Row 1 / 0.03125: 6.4->6, -3.2->-3, 1.6->2.
HAND_SMALL_NEAREST = [[0.25, -0.75, 1.0, 0.0, 0.5, -0.25, 0.75, 1.75],
                      [0.1875, -0.09375, 0.0625, 0.0, 0.0, 0.0, 0.0, 0.0]]
# One block, step 0.25 everywhere: row 1 / 0.25: 0.8->1, -0.4->0, 0.2->0.
HAND_BIG_NEAREST = [HAND_SMALL_NEAREST[0], [0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("block, expected", [("small", HAND_SMALL_NEAREST),
                                             ("big", HAND_BIG_NEAREST)])
def test_nearest_matches_hand_values_with_ties_rounded_half_up(block, expected):
    q = quantize(torch.tensor(HAND_X), BlockFloat(4, block, "nearest"))
    assert torch.equal(q, torch.tensor(expected))


def test_small_block_gives_one_vector_a_single_exponent():
    # Max 0.3 = 1.2 * 2^-2: e = -2, step 2^-4; 0.05 / 0.0625 = 0.8 -> 1. With its own
    # exponent (-5) 0.05 would become 6/128 = 0.046875 instead.
    q = quantize(torch.tensor([0.3, 0.05]), BlockFloat(4, "small", "nearest"))
    assert torch.equal(q, torch.tensor([0.3125, 0.0625]))


@pytest.mark.parametrize("block", ["small", "big"])
def test_stochastic_rounding_picks_one_of_the_two_hand_neighbours(block):
    # Row 0 of HAND_X with step 0.25: the two grid points around each value.
    neighbours = [{0.25, 0.5}, {-0.75, -0.5}, {1.0}, {0.0, 0.25}, {0.25, 0.5},
                  {-0.5, -0.25}, {0.5, 0.75}, {1.75}]
    x = torch.tensor([HAND_X[0]] * 2000)
    q = quantize(x, BlockFloat(4, block, "stochastic"), gen(0))
    for column, allowed in enumerate(neighbours):
        seen = set(q[:, column].tolist())
        assert seen == allowed, (column, seen)


def test_stochastic_rounding_is_unbiased():
    # x = (i + f) steps with hand-picked fractions f; 1.0 fixes e = 0, step 2^-6 (wl 8).
    # Each output is x_lo or x_lo + step, so by Hoeffding the mean of n draws satisfies
    # P(|mean - x| >= k * step / sqrt(4n)) <= 2 exp(-k^2 / 2): k = 6 gives 3e-8 per
    # value (about 0.01 step here). sigma = step / sqrt(4n) bounds the standard error,
    # as a Bernoulli variance is at most 1/4.
    fractions = [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.01, 0.99]
    step = 2.0 ** -6
    row = [1.0] + [(3 * i + f) * step * (-1) ** i for i, f in enumerate(fractions)]
    n = 100000
    x = torch.tensor([row] * n)
    q = quantize(x, BlockFloat(8, "big", "stochastic"), gen(1))
    mean = q.double().mean(dim=0)
    tolerance = 6 * step / math.sqrt(4 * n)
    assert ((mean - torch.tensor(row, dtype=torch.float64)).abs() <= tolerance).all()
    # The test has power: a biased rule (nearest) misses at least 6 of the 8 by more.
    nearest = quantize(x[:1], BlockFloat(8, "big", "nearest"))[0].double()
    assert ((nearest - torch.tensor(row, dtype=torch.float64)).abs() > tolerance).sum() >= 6


# ---------------------------------------------------------------- grid, range, idempotence

@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_outputs_lie_on_the_block_grid_inside_the_range(fmt):
    for shape in [(16, 3, 3, 3), (10, 20), (33,)]:
        x = varied_tensor(shape, seed=2)
        assert_on_grid(quantize(x, fmt, gen(3)), x, fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_quantizing_twice_changes_nothing(fmt):
    x = varied_tensor((32, 4, 3, 3), seed=4)
    # Minima that round to -128 steps = -2^(e+1) (e = 0, step 2^-6): the exponent must
    # not grow when the result is quantized again (it would with floor(log2 max)).
    x[0] = x[0] / x[0].abs().max()
    x[1] = -x[1].abs() / x[1].abs().max()
    x[:2, 0, 0, 0] = -(2 - 2.0 ** -20)
    vector = torch.cat([torch.tensor([-(2 - 2.0 ** -20)]), torch.randn(50, generator=gen(5))])
    for data in (x, vector):
        once = quantize(data, fmt, gen(5))
        twice = quantize(once, fmt, gen(6))
        assert torch.equal(once, twice)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_huge_word_length_returns_data_already_on_its_grid(rounding):
    # float64, wl 40: integers in (-2^39, 2^39) with 2^39 - 1 present: e = 38, step 1.
    g = gen(7)
    ints = torch.randint(-(2 ** 39) + 1, 2 ** 39, (6, 50), generator=g, dtype=torch.float64)
    ints[:, 0] = 2 ** 39 - 1
    x64 = ints * 2.0 ** torch.randint(-30, 30, (6, 1), generator=g).double()
    assert torch.equal(quantize(x64, BlockFloat(40, "small", rounding), g), x64)
    # float32, wl 24: integers in (-2^23, 2^23) with 2^23 - 1 present: e = 22, step 1.
    ints = torch.randint(-(2 ** 23) + 1, 2 ** 23, (6, 50), generator=g).float()
    ints[:, 0] = 2 ** 23 - 1
    x32 = ints * 2.0 ** torch.randint(-30, 30, (6, 1), generator=g).float()
    assert torch.equal(quantize(x32, BlockFloat(24, "small", rounding), g), x32)


def test_huge_word_length_moves_any_float64_by_at_most_half_a_step():
    x = varied_tensor((8, 100), seed=8).double() / 3
    q = quantize(x, BlockFloat(40, "small", "nearest"))
    assert_on_grid(q, x, BlockFloat(40, "small", "nearest"))


# ---------------------------------------------------------------- where the official code is wrong

@pytest.mark.parametrize("block", ["small", "big"])
@pytest.mark.parametrize("scale_exp", [0, -2, 5, -20])
def test_block_max_just_below_a_power_of_two_gets_the_exponent_below(block, scale_exp):
    # max = (1 - 2^-24) * 2^s: e = s - 1, step 2^(s-7). Top: 127.99999 steps -> 128 ->
    # clamped to 127; 41 * 2^(s-7) is on this grid. (The official per-row float32 log2
    # rounds log2 of the max up to s when |s| >= 2, giving step 2^(s-6), on which 41
    # steps of 2^(s-7) are a tie, rounded half to even to 40.)
    scale = 2.0 ** scale_exp
    x = torch.tensor([[0.99999994 * scale, 41 / 128 * scale]])
    q = quantize(x, BlockFloat(8, block, "nearest"))
    assert torch.equal(q, torch.tensor([[127 / 128 * scale, 41 / 128 * scale]]))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_all_zero_blocks_stay_zero(fmt):
    x = torch.randn(4, 6)
    x[2] = 0.0
    q = quantize(x, fmt, gen(9))
    assert torch.isfinite(q).all()
    if fmt.block == "small":
        assert torch.equal(q[2], torch.zeros(6))
    assert torch.equal(quantize(torch.zeros(3, 5), fmt, gen(9)), torch.zeros(3, 5))


@pytest.mark.parametrize("block", ["small", "big"])
def test_block_with_max_two_to_minus_130_is_quantized_not_saturated(block):
    # e = -130, step 2^-136: 2^-130 = 64 steps, -2^-131 = -32 steps, 5 * 2^-140 = 0.3125
    # steps -> 0, 13 * 2^-140 = 0.8125 steps -> 1 step. (Official: 2^(6+128) overflows
    # float32, every value saturates.)
    x = torch.tensor([[2.0 ** -130, -(2.0 ** -131), 5 * 2.0 ** -140, 13 * 2.0 ** -140]])
    q = quantize(x, BlockFloat(8, block, "nearest"))
    assert torch.equal(q, torch.tensor([[2.0 ** -130, -(2.0 ** -131), 0.0, 2.0 ** -136]]))
    stochastic = quantize(x.repeat(500, 1), BlockFloat(8, "big", "stochastic"), gen(10))
    assert set(stochastic[:, 2].tolist()) == {0.0, 2.0 ** -136}


@pytest.mark.parametrize("dtype, e", [(torch.float32, 100), (torch.float32, -100),
                                      (torch.float64, 900), (torch.float64, -900)])
def test_big_block_exponents_far_beyond_sixty_do_not_raise(dtype, e):
    # 2^e, 3 * 2^(e-5) = 6 steps of 2^(e-6): both on the grid; 2^(e-8) = 0.25 step -> 0.
    x = torch.tensor([2.0 ** e, 3 * 2.0 ** (e - 5), 2.0 ** (e - 8)], dtype=dtype)
    q = quantize(x, BlockFloat(8, "big", "nearest"))
    assert torch.equal(q, torch.tensor([2.0 ** e, 3 * 2.0 ** (e - 5), 0.0], dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_non_finite_input_raises_value_error(fmt, bad):
    x = torch.randn(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, fmt)


# ---------------------------------------------------------------- agreement with official code

def official_scaled(x: torch.Tensor, wl: int, block: str):
    """SWALP models/quantizer.py block_quantize (small_block "FC", block_dim "B") up to
    the rounding, written again in float64 so that its log2 is exact for float32 data.
    Returns v = x * 2^(wl-2-e) and the unit 2^(e-wl+2)."""
    x = x.double()
    if block == "small" and x.dim() >= 2:
        max_entry = x.abs().reshape(x.shape[0], -1).max(dim=1).values
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    else:
        max_entry = x.abs().max()
        shape = ()
    e = torch.floor(torch.log2(max_entry)).clamp(-128, 127).reshape(shape)
    return x * torch.pow(2.0, -e + wl - 2), torch.pow(2.0, e - wl + 2)


def official_block_quantize(x: torch.Tensor, wl: int, block: str, rounding: str,
                            noise=None) -> torch.Tensor:
    v, unit = official_scaled(x, wl, block)
    if rounding == "stochastic":
        v = torch.floor(v + noise.double())
    elif rounding == "half_up":
        v = torch.floor(v + 0.5)
    else:
        v = torch.round(v)  # official "nearest": torch.round, half to even
    return v.clamp(-2 ** (wl - 1), 2 ** (wl - 1) - 1) * unit


@pytest.mark.parametrize("block", ["small", "big"])
@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (40, 30), (64,)])
def test_agrees_with_official_formula_on_ordinary_data(block, shape):
    if len(shape) > 1:
        x = varied_tensor(shape, seed=11)
    else:
        x = torch.randn(shape, generator=gen(11))
    for wl in (4, 8):
        # Nearest: equal to floor(v + 0.5); equal to torch.round except at exact ties.
        q = quantize(x, BlockFloat(wl, block, "nearest")).double()
        assert torch.equal(q, official_block_quantize(x, wl, block, "half_up"))
        v, _ = official_scaled(x, wl, block)
        ties = v - v.floor() == 0.5
        assert torch.equal(q != official_block_quantize(x, wl, block, "half_even"), ties)
        # Stochastic: the same uniform noise gives the same values.
        noise = torch.rand(x.shape, generator=gen(12))
        q = quantize(x, BlockFloat(wl, block, "stochastic"), gen(12)).double()
        assert torch.equal(q, official_block_quantize(x, wl, block, "stochastic", noise))


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
    for p, w in zip(plain_model.parameters(), wrapped_model.parameters()):
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
    for p, q in zip(model_a.parameters(), model_b.parameters()):
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
