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
  * The grid step 2^(e-wl+2) is built exactly from exponent bits, and a block so tiny
    that half a step would be subnormal is first lifted by an exact power of two. So
    tiny blocks (M < 2^-121 at wl 8 in float32, where the official scale 2^(wl-2-e)
    overflows) are quantized, not saturated, and no Python float math can raise
    OverflowError (official big-block path: exponents beyond about +-60).
  * The exponent is not clamped to 8 bits (official: [-128, 127]); it spans the dtype.
  * Rounding decisions do not round v + U: with r = remainder(x, step) the result is
    (x - r) + step * [r + U*step >= step] (nearest: [r >= step/2]). In float32 the
    official v + U can itself round up to the next integer (probability about 2^-18
    per element at |v| >= 64, wl 8), which moves values already on the grid.
  * Nearest rounds half up, floor(v + 0.5), like QPyTorch. The official code's
    torch.round rounds half to even.
  * NaN or inf input raises ValueError (official: silent garbage).
"""

from typing import Optional

import torch

from .number import BlockFloat, check_format

# Half types are computed in float32: their few mantissa bits cannot hold r + U*step.
_COMPUTE_DTYPE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
# (mantissa bits, exponent bias, integer type of the same width) of each compute dtype.
_FLOAT_LAYOUT = {
    torch.float32: (23, 127, torch.int32),
    torch.float64: (52, 1023, torch.int64),
}


def _exact_pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2.0 ** k for integer k in the dtype's normal range, built from the exponent bits.

    Exact on every device, where exp2/pow/ldexp promise only an ulp bound.
    """
    mantissa_bits, bias, int_dtype = _FLOAT_LAYOUT[dtype]
    return ((k.to(int_dtype) + bias) << mantissa_bits).view(dtype)


def _block_exponent(x: torch.Tensor, fmt: BlockFloat):
    """Shared exponent e of each block (int tensor shaped to broadcast against x),
    and a 0-d bool tensor saying whether every value is finite."""
    if fmt.block == "small" and x.dim() >= 2:
        lo, hi = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
        block_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    else:
        lo, hi = torch.aminmax(x)
        block_shape = ()
    max_abs = torch.maximum(hi, -lo)
    mantissa, exponent = torch.frexp(max_abs)  # max_abs = mantissa * 2^exponent, exactly
    e = exponent - 1
    # -2^E alone at the top: use E - 1, where it is the integer -2^(wl-1) (see module doc).
    e = e - ((mantissa == 0.5) & (hi < max_abs)).to(e.dtype)
    return e.reshape(block_shape), torch.isfinite(max_abs).all()


def quantize(x: torch.Tensor, fmt: Optional[BlockFloat],
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round x onto the block-floating-point grid of `fmt`; returns a new tensor.

    Args:
        x: a floating-point tensor (float16, bfloat16, float32, float64), any device.
            Half types are computed in float32 and cast back, exact while the grid fits
            them (wl <= 9 for bfloat16, <= 12 for float16, inside their exponent range).
        fmt: the format; None means full precision and returns x itself.
        generator: source of the stochastic-rounding noise U, on x's device. The noise
            is exactly one `torch.rand(x.shape, dtype=D, device=x.device,
            generator=generator)`, D float64 for float64 input and float32 otherwise,
            drawn after the input is checked; nearest rounding draws nothing.

    Works in x's units with the grid step 2^(e-wl+2). r = remainder(x, step) is exact
    (fmod), except for negative x less than half a step from zero, where r is rounded
    to step * 2^-24 (float32); a stochastic decision can then differ from exact
    arithmetic with probability at most 2^-24. Nearest decisions are exact.
    Not differentiable (runs under no_grad); the straight-through use in training is in
    `modules.ActivationErrorQuantizer`. Raises ValueError on NaN or inf input.
    Cost (eager torch ops): one min/max reduction, then 5 elementwise passes (nearest)
    or 7 (stochastic, counting the noise draw); two new tensors; one device-to-host
    sync per call, for the finiteness check.
    """
    if check_format(fmt, "fmt") is None:
        return x
    if x.dtype not in _COMPUTE_DTYPE:
        raise TypeError(f"quantize expects a floating-point tensor "
                        f"(float16, bfloat16, float32, float64), got dtype {x.dtype}")
    if x.numel() == 0:
        return x.detach().clone()
    dtype = _COMPUTE_DTYPE[x.dtype]
    with torch.no_grad():
        xc = x.detach().to(dtype)
        e, finite = _block_exponent(xc, fmt)
        step_exp = e - (fmt.word_length_bits - 2)  # grid step = 2^step_exp
        # Tiny blocks: lift them so that even the half step 2^(step_exp-1) is a normal
        # number; scaling by a power of two is exact both ways.
        lowest_exp = 2 - _FLOAT_LAYOUT[dtype][1]  # -125 (float32), -1021 (float64)
        lift_exp = (lowest_exp - step_exp).clamp_(min=0)
        is_finite, needs_lift = torch.stack([finite, (lift_exp > 0).any()]).tolist()
        if not is_finite:
            bad = (~torch.isfinite(xc)).sum().item()
            raise ValueError(f"quantize got a tensor with non-finite values "
                             f"({bad} of {x.numel()} elements are NaN or inf), shape "
                             f"{tuple(x.shape)}; expected finite values")
        if needs_lift:
            xc = xc * _exact_pow2(lift_exp, dtype)
            step_exp = step_exp + lift_exp
        step = _exact_pow2(step_exp, dtype)
        low = torch.remainder(xc, step)  # x - floor(x / step) * step, in [0, step)
        if fmt.rounding == "stochastic":
            noise = torch.rand(x.shape, dtype=dtype, device=x.device, generator=generator)
            # floor(v + U) = floor(v) + [frac(v) + U >= 1], decided without rounding v + U
            round_up = torch.addcmul(low, noise, step, out=noise).ge_(step)
        else:
            # Half up. A float 0/1 result: a bool one would be converted inside addcmul_.
            round_up = torch.ge(low, _exact_pow2(step_exp - 1, dtype),
                                out=torch.empty_like(low))
        q = torch.sub(xc, low, out=low)  # floor(x / step) * step, exact
        q.addcmul_(round_up, step)
        # Only the top can overflow (|x| < 2^(e+1)); the bottom bound is for clarity.
        torch.clamp(q, step * fmt.int_min, step * fmt.int_max, out=q)
        if needs_lift:
            q.mul_(_exact_pow2(-lift_exp, dtype))
        return q.to(x.dtype)
