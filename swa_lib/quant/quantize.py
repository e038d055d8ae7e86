"""Block-floating-point quantization in plain torch ops, one function for every device.

SWALP: a block with max |x| = M shares the exponent e = floor(log2 M); each element
becomes clamp(round(x * 2^(wl-2-e)), -2^(wl-1), 2^(wl-1)-1) * 2^(e-wl+2).

Where this differs from the official SWALP quantizer (`models/quantizer.py`):
  * e comes from torch.frexp, exactly. The official per-row path takes log2 in float32,
    which rounds log2((1 - 2^-24) * 2^k) up to k when |k| >= 2 (max 0.24999999 gets
    e = -2, not -3), so such a block got a grid twice as coarse.
  * One exception to e = floor(log2 M): when M = 2^E is reached only by -2^E, the block
    takes e = E - 1, where -2^E is the representable integer -2^(wl-1). This makes
    quantize idempotent. With floor(log2 M), a block whose minimum had rounded to
    -2^(e+1) got e + 1 the next time it was quantized (SWALP quantizes weights that
    are already on a grid), and all its other values were rounded again onto a grid
    twice as coarse. Data that was not quantized before almost never has such a minimum.
  * An all-zero block stays zero (official: 0 * inf = NaN).
  * The grid step 2^(e-wl+2) and its inverse are built exactly from exponent bits, and
    a block whose step or inverse step would be subnormal is first shifted by an exact
    power of two (up for tiny blocks, down for a few near the dtype's top). So
    tiny blocks (M < 2^-121 at wl 8 in float32, where the official scale 2^(wl-2-e)
    overflows) are quantized, not saturated, and no Python float math can raise
    OverflowError (official big-block path: exponents beyond about +-60).
  * The exponent is not clamped to 8 bits (official: [-128, 127]); it spans the dtype.
  * Rounding decisions do not round v + U. Working in grid units v = x / step (exact:
    step is a power of two), with f = v - floor(v), stochastic rounding goes up iff
    k + 1 <= f * 2^24 for a uniform 24-bit integer k, which is floor(v + U) with
    U = (2^24 - 1 - k) / 2^24 decided exactly. In float32 the official v + U can itself
    round up to the next integer (probability about 2^-18 per element at |v| >= 64,
    wl 8), which moves values already on the grid.
  * The noise is 24 random bits per element cut from int64 `random_` words (two elements
    per word): on 2 CPU threads the draw alone takes about half the time of torch.rand.
  * Nearest rounds half up, floor(v + 0.5), like QPyTorch. The official code's
    torch.round rounds half to even.
  * NaN or inf input raises ValueError (official: silent garbage).
"""

import math

import torch

from swa_lib.quant.bits import COMPUTE_DTYPE, FLOAT_LAYOUT, NOISE_BITS, exact_pow2
from swa_lib.quant.fused import quantize_fused
from swa_lib.quant.number import BlockFloat, check_format


def _block_exponent(x: torch.Tensor, fmt: BlockFloat):
    """Shared exponent e of each block (int tensor shaped to broadcast against x),
    and a 0-d bool tensor saying whether every value is finite."""
    if fmt.block == "small" and x.dim() >= 2:
        rows = x.reshape(x.shape[0], -1)
        # amax and amin: on the CPU, aminmax over a dim is about 5x slower than the two.
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        block_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    else:
        lo, hi = x.amin(), x.amax()
        block_shape = ()
    max_abs = torch.maximum(hi, -lo)
    mantissa, exponent = torch.frexp(max_abs)  # max_abs = mantissa * 2^exponent, exactly
    e = exponent - 1
    # -2^E alone at the top: use E - 1, where it is the integer -2^(wl-1) (see module doc).
    e = e - ((mantissa == 0.5) & (hi < max_abs)).to(e.dtype)
    return e.reshape(block_shape), torch.isfinite(max_abs).all()



def rounding_bits(shape, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """The stochastic-rounding noise of `quantize`: uniform integers in [0, 2^24), int32.

    Drawn as ceil(n / 2) int64 `random_` words from `generator` on `device`, each split
    into two 32-bit halves whose low 24 bits are kept. Exposed so that tests can
    replay exactly the noise a call used.
    """
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(generator=generator)
    return words.view(torch.int32)[:n].bitwise_and_((1 << NOISE_BITS) - 1).reshape(shape)


def quantize(x: torch.Tensor, fmt: BlockFloat | None,
             generator: torch.Generator | None = None, fused: bool = False) -> torch.Tensor:
    """Round x onto the block-floating-point grid of `fmt`; returns a new tensor.

    Args:
        x: a floating-point tensor (float16, bfloat16, float32, float64), any device.
            Half types are computed in float32 and cast back, exact while the grid fits
            them (wl <= 9 for bfloat16, <= 12 for float16, inside their exponent range).
        fmt: the format; None means full precision and returns x itself.
        generator: source of the stochastic-rounding noise, on x's device: exactly one
            `rounding_bits(x.shape, generator, x.device)`, drawn after the input is
            checked; nearest rounding draws nothing.
        fused: compute in two torch.compile'd kernels (swa_lib/quant/fused.py): 1.2-5x
            faster on a CPU (results/quantize_cpu.md), compiled on the first call of
            each variant. Nearest rounding
            gives bitwise the same result; stochastic rounding applies the same rule to
            noise from a counter-based hash keyed by one seed drawn from `generator`
            (`fused_rounding_bits`), so its values differ from the eager ones.

    Works in grid units v = x / 2^(e-wl+2), exact. f = v - floor(v) is exact except for
    negative v above -1/2, where it rounds (float32: to 2^-24); a stochastic decision
    can then differ from exact arithmetic with probability at most 2^-24. Nearest
    decisions are exact. Stochastic rounding is unbiased up to the 2^-24 resolution of
    the noise: P(up) = floor(f * 2^24) / 2^24.
    Not differentiable (runs under no_grad); the straight-through use in training is in
    `modules.ActivationErrorQuantizer`. Raises ValueError on NaN or inf input.
    Cost (eager torch ops): a min and a max reduction, then 6 elementwise passes
    (nearest) or 9 plus the noise draw (stochastic); two new tensors (three with noise);
    one device-to-host sync per call, for the finiteness check.
    """
    if check_format(fmt, "fmt") is None:
        return x
    if x.dtype not in COMPUTE_DTYPE:
        raise TypeError(f"quantize expects a floating-point tensor "
                        f"(float16, bfloat16, float32, float64), got dtype {x.dtype}")
    if x.numel() == 0:
        return x.detach().clone()
    if fused:
        return quantize_fused(x, fmt, generator)
    dtype = COMPUTE_DTYPE[x.dtype]
    with torch.no_grad():
        xc = x.detach().to(dtype)
        e, finite = _block_exponent(xc, fmt)
        step_exp = e - (fmt.word_length_bits - 2)  # grid step = 2^step_exp
        # Grid units need both 2^step_exp and 2^-step_exp to be normal numbers. Blocks
        # outside that range are first shifted by an exact power of two 2^shift_exp (up
        # for tiny blocks, down for the few near the dtype's top) and shifted back at the
        # end. Down-shifting can make values far below the block's max subnormal; they
        # lie below 2^-240 steps, where no rounding decision depends on their lost bits.
        lowest_exp = 2 - FLOAT_LAYOUT[dtype][1]  # -125 (float32), -1021 (float64)
        shift_exp = (lowest_exp - step_exp).clamp_(min=0) - (step_exp + lowest_exp).clamp_(min=0)
        is_finite, needs_shift = torch.stack([finite, (shift_exp != 0).any()]).tolist()
        if not is_finite:
            bad = (~torch.isfinite(xc)).sum().item()
            raise ValueError(f"quantize got a tensor with non-finite values "
                             f"({bad} of {x.numel()} elements are NaN or inf), shape "
                             f"{tuple(x.shape)}; expected finite values")
        if needs_shift:
            xc = xc * exact_pow2(shift_exp, dtype)
            step_exp = step_exp + shift_exp
        v = xc * exact_pow2(-step_exp, dtype)  # grid units, exact: |v| <= 2^(wl-1)
        q = torch.floor(v)
        frac = v.sub_(q)  # in [0, 1]
        if fmt.rounding == "stochastic":
            k = rounding_bits(x.shape, generator, x.device)
            # k + 1 <= f * 2^24  <=>  k - f * 2^24 <= -1, exact in the compute dtype
            round_up = k.to(dtype).sub_(frac, alpha=1 << NOISE_BITS).le_(-1)
        else:
            round_up = frac.ge_(0.5)  # half up; a float 0/1 in place
        q.add_(round_up)
        # Only the top can overflow (|x| < 2^(e+1)); the bottom bound is for clarity.
        q.clamp_(fmt.int_min, fmt.int_max).mul_(exact_pow2(step_exp, dtype))
        if needs_shift:
            q.mul_(exact_pow2(-shift_exp, dtype))
        return q.to(x.dtype)
