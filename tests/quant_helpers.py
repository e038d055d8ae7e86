"""Helpers shared by the swa_lib.quant tests: formats, block views and a grid check."""
import math

import torch

from swa_lib.quant import BlockFloat

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
    for q_block, x_block in zip(blocks_of(q, fmt), blocks_of(x, fmt), strict=True):
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


def assert_is_a_grid_neighbour(q: torch.Tensor, x: torch.Tensor, fmt: BlockFloat) -> None:
    """An oracle that enumerates the grid: every representable value of each block,
    k * 2^(e-wl+2) for k in [-2^(wl-1), 2^(wl-1) - 1], with e from `reference_exponent`.

    Each value of q must be the grid value nearest to x (ties up) for nearest rounding, or
    one of the two grid values around x for stochastic rounding; a value of x that lies on
    the grid must come back unchanged either way, and one above the top saturates to it."""
    wl = fmt.word_length_bits
    checked = 0
    for q_block, x_block in zip(blocks_of(q, fmt), blocks_of(x, fmt), strict=True):
        if not x_block.any():
            assert not q_block.any()
            continue
        step = 2.0 ** (reference_exponent(x_block) - wl + 2)
        grid = torch.arange(-(2 ** (wl - 1)), 2 ** (wl - 1), dtype=torch.float64) * step
        assert grid[0] <= x_block.min(), "the block's minimum lies below its grid: wrong exponent"
        above = torch.searchsorted(grid, x_block, right=True)  # grid[above - 1] <= x < grid[above]
        lo = grid[above - 1]
        hi = grid[above.clamp(max=len(grid) - 1)]
        if fmt.rounding == "nearest":
            expected = torch.where(x_block - lo >= (hi - lo) / 2, hi, lo)
            assert torch.equal(q_block, expected), "not the nearest grid value (ties up)"
        else:
            assert ((q_block == lo) | (q_block == hi)).all(), "not one of the two grid neighbours"
        on_grid = x_block == lo
        assert torch.equal(q_block[on_grid], x_block[on_grid]), "a value already on the grid moved"
        checked += x_block.numel()
    assert checked > 0, "no non-zero block was checked"
