"""quantize(..., fused=True): the same rounding in two torch.compile'd kernels per call.

The eager quantize makes about ten passes over memory (two reductions, elementwise
steps, the noise draw). Here torch.compile (inductor) makes two kernels of it: one
reduction that computes each block's powers of two, and one elementwise pass that
rounds, with the noise computed in the kernel instead of read from memory: two reads
and one write of the tensor. Nothing is compiled at import; the first call of each
variant compiles (seconds to tens of seconds on a CPU) and later calls reuse it.

Results:
  * Nearest rounding: bitwise equal to the eager quantize (the same exact operations;
    the shift of extreme blocks is applied always, as a multiplication by 1 when not
    needed).
  * Stochastic rounding: the same rule (up iff k + 1 <= f * 2^24 for a 24-bit k), but k
    comes from a counter-based hash of the element's index keyed by one 31-bit seed per
    call, not from `random_`. The seed is drawn from the generator, so a seeded
    generator still gives reproducible results, and the same seed gives the same noise
    on every device (by construction: integer arithmetic only; no GPU has checked it).
    `fused_rounding_bits` returns exactly that noise, for tests. The index is the element's
    position in memory order: row-major, or N, H, W, C for a channels_last tensor (whose
    result is channels_last too).
The hash is Mueller's 32-bit integer mixer (two multiply-xorshift rounds), applied
twice: k = mix(mix(i) ^ seed) mod 2^24. It is a statistical generator, not a
cryptographic one, which is all rounding noise needs; the tests check the
unbiasedness of the rounding and the balance of every noise bit.
"""

import functools
import math

import torch

from swa_lib.quant.bits import COMPUTE_DTYPE, FLOAT_LAYOUT, NOISE_BITS, exact_pow2
from swa_lib.quant.number import BlockFloat

_MIX_MULTIPLIER = 0x45D9F3B  # < 2^27; int32 products wrap modulo 2^32
_SEED_BOUND = (1 << 31) - 1
# Element indices are int32 inside the kernel.
MAX_FUSED_ELEMENTS = (1 << 31) - 1


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit patterns held in int32 (shifts made logical by a mask)."""
    h = (h ^ ((h >> 16) & 0xFFFF)) * _MIX_MULTIPLIER
    h = (h ^ ((h >> 16) & 0xFFFF)) * _MIX_MULTIPLIER
    return h ^ ((h >> 16) & 0xFFFF)


def _counter_bits(numel: int, seed: torch.Tensor, device) -> torch.Tensor:
    """24-bit noise of elements 0 .. numel-1 for one seed (0-d int32 tensor)."""
    index = torch.arange(numel, dtype=torch.int32, device=device)
    return _mix32(_mix32(index) ^ seed) & ((1 << NOISE_BITS) - 1)


def draw_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    """The per-call seed: a 0-d int32 tensor on `device`, drawn from `generator` (or the
    device's default generator). No host sync."""
    return torch.randint(0, _SEED_BOUND, (), generator=generator, device=device,
                         dtype=torch.int32)


def fused_rounding_bits(shape, generator: torch.Generator | None = None,
                        device: torch.device | None = None) -> torch.Tensor:
    """The stochastic-rounding noise of `quantize(..., fused=True)` for a tensor of
    `shape`: uniform integers in [0, 2^24), int32, row-major. Draws one seed from
    `generator`, as quantize does, so tests can replay exactly the noise of a call."""
    seed = draw_seed(generator, device)
    return _counter_bits(math.prod(shape), seed, seed.device).reshape(shape)


def _floor_log2(m: torch.Tensor):
    """floor(log2 m) for finite m >= 0 (-1 for 0, as torch.frexp gives) in the integer
    type of m's width, and whether m is a power of two; read from the exponent bits.

    The eager `_block_exponent` calls torch.frexp for this; here the exponent bits are
    read directly, because inductor's CPU code generator fails to compile a vectorized
    float64 frexp (an int32 exponent next to float64 lanes). Subnormals are first scaled
    by 2^64 (exact) into the normal range.
    """
    mantissa_bits, bias, int_dtype = FLOAT_LAYOUT[m.dtype]
    subnormal = m < 2.0 ** (1 - bias)
    bits = torch.where(subnormal, m * 2.0 ** 64, m).view(int_dtype)
    e = (bits >> mantissa_bits) - bias - subnormal.to(int_dtype) * 64
    e = torch.where(m == 0, -1, e)
    power_of_two = ((bits & ((1 << mantissa_bits) - 1)) == 0) & (m > 0)
    return e, power_of_two


def _block_scales(rows: torch.Tensor, word_length: int, one_block: bool):
    """Per-block powers of two for `rows` (2-D, float32 or float64): each row is a
    block, or with `one_block` the whole tensor is (its rows then only let the
    elementwise kernel split the work over threads).

    Returns (pre, inv_step, step, post), each shaped (rows, 1) or (1, 1), and a 0-d bool
    tensor, whether every value was finite. In grid units v = x * pre * inv_step and the
    result is round(v) * step * post: pre = 2^shift and post = 2^-shift are the exact
    shift of the eager quantize (1 for ordinary blocks), step = 2^(e - wl + 2) on the
    shifted block. `word_length` is an int, a symbolic one under
    torch.compile(dynamic=True), so one compiled kernel serves every word length.
    """
    dtype = rows.dtype
    bias = FLOAT_LAYOUT[dtype][1]
    dims = (0, 1) if one_block else 1
    lo, hi = rows.amin(dim=dims, keepdim=True), rows.amax(dim=dims, keepdim=True)
    max_abs = torch.maximum(hi, -lo)
    e, power_of_two = _floor_log2(max_abs)
    e = e - (power_of_two & (hi < max_abs)).to(e.dtype)  # -2^E alone at the top: E - 1
    step_exp = e - (word_length - 2)
    lowest_exp = 2 - bias
    shift_exp = (lowest_exp - step_exp).clamp(min=0) - (step_exp + lowest_exp).clamp(min=0)
    step_exp = step_exp + shift_exp
    return (exact_pow2(shift_exp, dtype), exact_pow2(-step_exp, dtype),
            exact_pow2(step_exp, dtype), exact_pow2(-shift_exp, dtype),
            torch.isfinite(max_abs).all())


def _round_scaled(rows: torch.Tensor, pre: torch.Tensor, inv_step: torch.Tensor,
                  step: torch.Tensor, post: torch.Tensor, int_max: int,
                  seed: torch.Tensor | None) -> torch.Tensor:
    """The elementwise rounding, with the eager quantize's arithmetic: v = x * pre *
    inv_step (exact), floor, the rounding decision (`seed` None: nearest, half up),
    clamp to [-int_max - 1, int_max], back to x's units. int_max is passed in rather than
    computed, because the kernel would compute 1 << (wl - 1) in 32 bits."""
    v = (rows * pre) * inv_step
    q = torch.floor(v)
    frac = v - q
    if seed is None:
        round_up = frac >= 0.5
    else:
        k = _counter_bits(rows.numel(), seed, rows.device).reshape(rows.shape)
        round_up = (k.to(rows.dtype) - frac * (1 << NOISE_BITS)) <= -1
    q = torch.clamp(q + round_up.to(rows.dtype), min=-int_max - 1, max=int_max)
    return (q * step) * post


# The four functions that get compiled, each its own code object so that each has its
# own recompile budget: the dtype, a single row and a (1, 1) scale are specialised, at
# most 6 variants each, within dynamo's default limit of 8.
def _scales_per_row(rows, word_length):
    return _block_scales(rows, word_length, one_block=False)


def _scales_one_block(rows, word_length):
    return _block_scales(rows, word_length, one_block=True)


def _round_nearest(rows, pre, inv_step, step, post, int_max):
    return _round_scaled(rows, pre, inv_step, step, post, int_max, None)


def _round_stochastic(rows, pre, inv_step, step, post, int_max, seed):
    return _round_scaled(rows, pre, inv_step, step, post, int_max, seed)


# Two kernels per call, not one: compiled as a single kernel, inductor recomputed the
# per-block exponent arithmetic (a scalar frexp and bit twiddling) for every vector of
# elements, which cost more than the second read of the input saves.
@functools.cache
def _compiled(fn):
    """fn compiled (torch.compile, dynamic shapes) on first use."""
    return torch.compile(fn, dynamic=True)


def quantize_fused(x: torch.Tensor, fmt: BlockFloat, generator: torch.Generator | None,
                   compiled: bool = True) -> torch.Tensor:
    """Body of quantize(x, fmt, generator, fused=True); x is a non-empty float tensor.

    compiled=False runs the same function eagerly (slow), which tests use to check
    the compiler's output bit for bit.
    """
    if x.numel() > MAX_FUSED_ELEMENTS:
        raise ValueError(f"quantize(fused=True) takes at most {MAX_FUSED_ELEMENTS} elements "
                         f"(int32 indices), got {x.numel()}; use fused=False")
    # Rows are the slices of dim 0 (a 1-D tensor is one row). A big block of a tensor
    # with 2 or more dims keeps those rows, reduced as one block, so that the kernels'
    # outer loops still run on several threads.
    # Half types are cast outside the kernels, which then see float32 or float64 only.
    # The final detach drops the view's _base, on which dynamo would otherwise guard
    # (recompiling for every new shape of the tensor the rows came from).
    # A channels_last tensor is read in memory order (N, H, W, C), where each sample is
    # still one contiguous row, and the result keeps that layout.
    channels_last = (x.dim() == 4 and not x.is_contiguous()
                     and x.is_contiguous(memory_format=torch.channels_last))
    compute = x.to(COMPUTE_DTYPE[x.dtype])
    if channels_last:
        compute = compute.permute(0, 2, 3, 1)
    rows = compute.reshape(x.shape[0] if x.dim() >= 2 else 1, -1).detach()
    one_block = fmt.block == "big" and x.dim() >= 2
    stochastic = fmt.rounding == "stochastic"
    seed = draw_seed(generator, x.device) if stochastic else None
    scales_fn = _scales_one_block if one_block else _scales_per_row
    round_fn = _round_stochastic if stochastic else _round_nearest
    if compiled:
        scales_fn, round_fn = _compiled(scales_fn), _compiled(round_fn)
    with torch.no_grad():
        *scales, finite = scales_fn(rows, fmt.word_length_bits)
        if not finite.item():
            bad = (~torch.isfinite(x)).sum().item()
            raise ValueError(f"quantize got a tensor with non-finite values "
                             f"({bad} of {x.numel()} elements are NaN or inf), shape "
                             f"{tuple(x.shape)}; expected finite values")
        q = round_fn(rows, *scales, fmt.int_max, *((seed,) if stochastic else ()))
    if channels_last:
        return q.reshape(compute.shape).permute(0, 3, 1, 2).to(x.dtype)
    return q.reshape(x.shape).to(x.dtype)
