"""Bit-level float helpers shared by the eager (quantize.py) and compiled (fused.py) quantizers.

A leaf of swa_lib.quant: both quantizers import it, and quantize.py can import fused.py at
the top without a cycle.
"""
from __future__ import annotations

import torch

# Half types are computed in float32: their few mantissa bits cannot hold r + U*step.
COMPUTE_DTYPE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
# (mantissa bits, exponent bias, integer type of the same width) of each compute dtype.
FLOAT_LAYOUT = {
    torch.float32: (23, 127, torch.int32),
    torch.float64: (52, 1023, torch.int64),
}
# Random bits per element of the stochastic-rounding noise (both quantizers).
NOISE_BITS = 24


def exact_pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2.0 ** k for integer k in the dtype's normal range, built from the exponent bits.

    Exact on every device, where exp2/pow/ldexp promise only an ulp bound.
    """
    mantissa_bits, bias, int_dtype = FLOAT_LAYOUT[dtype]
    return ((k.to(int_dtype) + bias) << mantissa_bits).view(dtype)
