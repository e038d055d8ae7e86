"""The block-floating-point number format of SWALP (Yang et al., ICML 2019).

A block of numbers shares one exponent e; each element keeps a signed integer
mantissa of `word_length_bits` bits, so the block's values are
i * 2^(e - word_length_bits + 2) with i in [-2^(wl-1), 2^(wl-1) - 1].
"""

from dataclasses import dataclass

BLOCK_DESIGNS = ("small", "big")
ROUNDINGS = ("stochastic", "nearest")
# Below 2 bits the integer range [-2^(wl-1), 2^(wl-1)-1] holds no positive value;
# above 64 nothing changes for any float dtype torch has (float64 keeps 53 bits).
MIN_WORD_LENGTH_BITS = 2
MAX_WORD_LENGTH_BITS = 64


@dataclass(frozen=True)
class BlockFloat:
    """A block-floating-point format: word length, block design and rounding.

    Args:
        word_length_bits: bits of each element's signed integer mantissa (SWALP uses 8),
            an int in [2, 64].
        block: "small" gives one exponent per slice along dim 0 (per output filter
            for weights, per sample for activations and errors); tensors with fewer
            than 2 dims (biases, BN parameters) get one exponent. "big" gives one
            exponent per tensor.
        rounding: "stochastic" (unbiased: floor(v + U[0,1))) or "nearest" (round
            half up, floor(v + 0.5), as QPyTorch; the official SWALP code uses
            torch.round, which rounds half to even).

    Call sites take `BlockFloat | None`; None there means full precision.
    """

    word_length_bits: int = 8
    block: str = "small"
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        wl = self.word_length_bits
        # bool is an int subclass; True as a word length is a bug, not 1 bit.
        if isinstance(wl, bool) or not isinstance(wl, int) or not (
                MIN_WORD_LENGTH_BITS <= wl <= MAX_WORD_LENGTH_BITS):
            raise ValueError(
                f"BlockFloat.word_length_bits={wl!r} is invalid; expected an int in "
                f"[{MIN_WORD_LENGTH_BITS}, {MAX_WORD_LENGTH_BITS}]")
        if self.block not in BLOCK_DESIGNS:
            raise ValueError(
                f"BlockFloat.block={self.block!r} is invalid; expected one of {BLOCK_DESIGNS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"BlockFloat.rounding={self.rounding!r} is invalid; expected one of {ROUNDINGS}")

    @property
    def int_min(self) -> int:
        """Smallest integer mantissa, -2^(wl-1) (the range is asymmetric, as official)."""
        return -(1 << (self.word_length_bits - 1))

    @property
    def int_max(self) -> int:
        """Largest integer mantissa, 2^(wl-1) - 1."""
        return (1 << (self.word_length_bits - 1)) - 1

    def __str__(self) -> str:
        return f"BlockFloat(wl={self.word_length_bits}, {self.block} block, {self.rounding})"


def check_format(fmt: BlockFloat | None, name: str) -> BlockFloat | None:
    """Return `fmt` if it is a BlockFloat or None, else raise TypeError naming `name`."""
    if fmt is not None and not isinstance(fmt, BlockFloat):
        raise TypeError(f"{name} must be a BlockFloat or None (full precision), "
                        f"got {type(fmt).__name__}: {fmt!r}")
    return fmt
