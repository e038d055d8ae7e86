"""swa_lib.quant's number format and quantize(). Each test names its invariant.

Oracles: numbers worked out by hand (written in the tests), the official SWALP
formula re-implemented here in float64, and per-block exponents computed with Python's
math.frexp. Tests marked with the `fused` parameter run both the eager quantizer and
the torch.compile'd one (quantize(..., fused=True)); tests/test_quant_fused.py has the
checks that only the fused one needs.
"""
import math

import pytest
import torch

from quant_helpers import ALL_FORMATS, assert_is_a_grid_neighbour, assert_on_grid, gen, varied_tensor
from swa_lib.quant import BlockFloat, fused_rounding_bits, quantize, rounding_bits

both = pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])


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


@both
@pytest.mark.parametrize("block, expected", [("small", HAND_SMALL_NEAREST),
                                             ("big", HAND_BIG_NEAREST)])
def test_nearest_matches_hand_values_with_ties_rounded_half_up(block, expected, fused):
    q = quantize(torch.tensor(HAND_X), BlockFloat(4, block, "nearest"), fused=fused)
    assert torch.equal(q, torch.tensor(expected))


def test_small_block_gives_one_vector_a_single_exponent():
    # Max 0.3 = 1.2 * 2^-2: e = -2, step 2^-4; 0.05 / 0.0625 = 0.8 -> 1. With its own
    # exponent (-5) 0.05 would become 6/128 = 0.046875 instead.
    q = quantize(torch.tensor([0.3, 0.05]), BlockFloat(4, "small", "nearest"))
    assert torch.equal(q, torch.tensor([0.3125, 0.0625]))


@both
@pytest.mark.parametrize("block", ["small", "big"])
def test_stochastic_rounding_picks_one_of_the_two_hand_neighbours(block, fused):
    # Row 0 of HAND_X with step 0.25: the two grid points around each value.
    neighbours = [{0.25, 0.5}, {-0.75, -0.5}, {1.0}, {0.0, 0.25}, {0.25, 0.5},
                  {-0.5, -0.25}, {0.5, 0.75}, {1.75}]
    x = torch.tensor([HAND_X[0]] * 2000)
    q = quantize(x, BlockFloat(4, block, "stochastic"), gen(0), fused)
    for column, allowed in enumerate(neighbours):
        seen = set(q[:, column].tolist())
        assert seen == allowed, (column, seen)


@both
def test_stochastic_rounding_is_unbiased(fused):
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
    q = quantize(x, BlockFloat(8, "big", "stochastic"), gen(1), fused)
    mean = q.double().mean(dim=0)
    tolerance = 6 * step / math.sqrt(4 * n)
    assert ((mean - torch.tensor(row, dtype=torch.float64)).abs() <= tolerance).all()
    # The test has power: a biased rule (nearest) misses at least 6 of the 8 by more.
    nearest = quantize(x[:1], BlockFloat(8, "big", "nearest"))[0].double()
    assert ((nearest - torch.tensor(row, dtype=torch.float64)).abs() > tolerance).sum() >= 6


# ---------------------------------------------------------------- grid, range, idempotence

@both
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_outputs_lie_on_the_block_grid_inside_the_range(fmt, fused):
    for shape in [(16, 3, 3, 3), (10, 20), (33,)]:
        x = varied_tensor(shape, seed=2)
        assert_on_grid(quantize(x, fmt, gen(3), fused), x, fmt)


@both
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_output_is_a_neighbour_on_the_enumerated_grid_and_grid_values_stay(fmt, fused):
    x = varied_tensor((32, 4, 3, 3), seed=4)
    # Minima that round to -128 steps = -2^(e+1) (e = 0, step 2^-6): quantized again, such a
    # block must keep its exponent (it would not with floor(log2 max)), so its values stay.
    x[0] = x[0] / x[0].abs().max()
    x[1] = -x[1].abs() / x[1].abs().max()
    x[:2, 0, 0, 0] = -(2 - 2.0 ** -20)
    vector = torch.cat([torch.tensor([-(2 - 2.0 ** -20)]), torch.randn(50, generator=gen(5))])
    for data in (x, vector):
        once = quantize(data, fmt, gen(5), fused)
        assert_is_a_grid_neighbour(once, data, fmt)
        # The output is on its own grid (that of its own block exponents), so it must not move.
        assert_is_a_grid_neighbour(quantize(once, fmt, gen(6), fused), once, fmt)


@both
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_huge_word_length_returns_data_already_on_its_grid(rounding, fused):
    # float64, wl 40: integers in (-2^39, 2^39) with 2^39 - 1 present: e = 38, step 1.
    g = gen(7)
    ints = torch.randint(-(2 ** 39) + 1, 2 ** 39, (6, 50), generator=g, dtype=torch.float64)
    ints[:, 0] = 2 ** 39 - 1
    x64 = ints * 2.0 ** torch.randint(-30, 30, (6, 1), generator=g).double()
    assert torch.equal(quantize(x64, BlockFloat(40, "small", rounding), g, fused), x64)
    # float32, wl 24: integers in (-2^23, 2^23) with 2^23 - 1 present: e = 22, step 1.
    ints = torch.randint(-(2 ** 23) + 1, 2 ** 23, (6, 50), generator=g).float()
    ints[:, 0] = 2 ** 23 - 1
    x32 = ints * 2.0 ** torch.randint(-30, 30, (6, 1), generator=g).float()
    assert torch.equal(quantize(x32, BlockFloat(24, "small", rounding), g, fused), x32)


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


@both
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_all_zero_blocks_stay_zero(fmt, fused):
    x = torch.randn(4, 6)
    x[2] = 0.0
    q = quantize(x, fmt, gen(9), fused)
    assert torch.isfinite(q).all()
    if fmt.block == "small":
        assert torch.equal(q[2], torch.zeros(6))
    assert torch.equal(quantize(torch.zeros(3, 5), fmt, gen(9), fused), torch.zeros(3, 5))


@both
@pytest.mark.parametrize("block", ["small", "big"])
def test_block_with_max_two_to_minus_130_is_quantized_not_saturated(block, fused):
    # e = -130, step 2^-136: 2^-130 = 64 steps, -2^-131 = -32 steps, 5 * 2^-140 = 0.3125
    # steps -> 0, 13 * 2^-140 = 0.8125 steps -> 1 step. (Official: 2^(6+128) overflows
    # float32, every value saturates.)
    x = torch.tensor([[2.0 ** -130, -(2.0 ** -131), 5 * 2.0 ** -140, 13 * 2.0 ** -140]])
    q = quantize(x, BlockFloat(8, block, "nearest"), fused=fused)
    assert torch.equal(q, torch.tensor([[2.0 ** -130, -(2.0 ** -131), 0.0, 2.0 ** -136]]))
    stochastic = quantize(x.repeat(500, 1), BlockFloat(8, "big", "stochastic"), gen(10), fused)
    assert set(stochastic[:, 2].tolist()) == {0.0, 2.0 ** -136}


@both
@pytest.mark.parametrize("dtype, e", [(torch.float32, 100), (torch.float32, -100),
                                      (torch.float64, 900), (torch.float64, -900)])
def test_big_block_exponents_far_beyond_sixty_do_not_raise(dtype, e, fused):
    # 2^e, 3 * 2^(e-5) = 6 steps of 2^(e-6): both on the grid; 2^(e-8) = 0.25 step -> 0.
    x = torch.tensor([2.0 ** e, 3 * 2.0 ** (e - 5), 2.0 ** (e - 8)], dtype=dtype)
    q = quantize(x, BlockFloat(8, "big", "nearest"), fused=fused)
    assert torch.equal(q, torch.tensor([2.0 ** e, 3 * 2.0 ** (e - 5), 0.0], dtype=dtype))


@both
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_at_the_top_of_the_dtype_with_two_and_three_bit_words(dtype, rounding, fused):
    # max = 1.5 * 2^emax: e = emax, step 2^(emax - wl + 2), whose inverse is subnormal for wl 2
    # (quantize shifts the block down first). Integers in [-2, 1] (wl 2) or [-4, 3] (wl 3):
    # 1.5 * 2^emax -> 1 step of 2^emax (wl 2) or 3 steps of 2^(emax-1) (wl 3); -2^emax -> -1 or -2 steps;
    # 2^(emax-3) is 1/8 or 1/4 of a step: 0 for nearest, one step or 0 for stochastic.
    emax = {torch.float32: 127, torch.float64: 1023}[dtype]
    x = torch.tensor([1.5 * 2.0 ** emax, -(2.0 ** emax), 2.0 ** (emax - 3)], dtype=dtype)
    for wl, expected_top, step in ((2, 2.0 ** emax, 2.0 ** emax), (3, 1.5 * 2.0 ** emax, 2.0 ** (emax - 1))):
        q = quantize(x.repeat(400, 1), BlockFloat(wl, "big", rounding), gen(13), fused)
        assert torch.equal(q[:, 0], torch.full((400,), expected_top, dtype=dtype))
        assert torch.equal(q[:, 1], torch.full((400,), -(2.0 ** emax), dtype=dtype))
        small = set(q[:, 2].tolist())
        assert small == ({0.0} if rounding == "nearest" else {0.0, step})


@both
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_non_finite_input_raises_value_error(fmt, bad, fused):
    x = torch.randn(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, fmt, fused=fused)


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


@both
@pytest.mark.parametrize("block", ["small", "big"])
@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (40, 30), (64,)])
def test_agrees_with_official_formula_on_ordinary_data(block, shape, fused):
    if len(shape) > 1:
        x = varied_tensor(shape, seed=11)
    else:
        x = torch.randn(shape, generator=gen(11))
    for wl in (4, 8):
        # Nearest: equal to floor(v + 0.5); equal to torch.round except at exact ties.
        q = quantize(x, BlockFloat(wl, block, "nearest"), fused=fused).double()
        assert torch.equal(q, official_block_quantize(x, wl, block, "half_up"))
        v, _ = official_scaled(x, wl, block)
        ties = v - v.floor() == 0.5
        assert torch.equal(q != official_block_quantize(x, wl, block, "half_even"), ties)
        # Stochastic: the same noise gives the same values. quantize draws 24-bit integers k
        # and rounds up iff k + 1 <= frac(v) * 2^24, which is floor(v + U) for this U.
        bits = (fused_rounding_bits if fused else rounding_bits)(x.shape, gen(12))
        noise = 1 - (bits.double() + 1) * 2.0 ** -24
        q = quantize(x, BlockFloat(wl, block, "stochastic"), gen(12), fused).double()
        assert torch.equal(q, official_block_quantize(x, wl, block, "stochastic", noise))
