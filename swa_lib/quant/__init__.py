"""SWALP low precision, kept outside the training loop (Yang et al., ICML 2019).

  number    BlockFloat: word length, block design ("small" / "big"), rounding
  quantize  quantize(x, fmt, generator, fused): block floating point in plain torch ops;
            rounding_bits, the noise it draws for stochastic rounding
  fused     the fused=True path: two torch.compile'd kernels per call, with
            fused_rounding_bits, its counter-based noise
  modules   activation / error quantizers put into any model with forward pre-hooks
  placement named choices of where they go (layer_inputs, relu_outputs, official)
  optim     QuantizedSGD: quantized gradients, momentum, accumulator and weights
A format of None means full precision wherever a format is taken.
"""

from swa_lib.quant.fused import fused_rounding_bits
from swa_lib.quant.modules import (
    ActivationErrorQuantizer,
    ActivationQuantizer,
    ErrorQuantizer,
    insert_quantizers,
    insert_quantizers_at,
    quantization_points,
    quantize_activation_error,
    quantizers_disabled,
    remove_quantizers,
    set_quantizers_enabled,
)
from swa_lib.quant.number import BlockFloat
from swa_lib.quant.optim import QuantizedSGD
from swa_lib.quant.placement import PLACEMENTS, insert_quantizers_by_placement, placement_points
from swa_lib.quant.quantize import quantize, rounding_bits

__all__ = [
    "BlockFloat", "quantize", "rounding_bits", "fused_rounding_bits",
    "quantize_activation_error", "ActivationErrorQuantizer",
    "ActivationQuantizer", "ErrorQuantizer", "insert_quantizers", "remove_quantizers",
    "insert_quantizers_at", "quantization_points", "PLACEMENTS", "placement_points",
    "insert_quantizers_by_placement",
    "set_quantizers_enabled", "quantizers_disabled", "QuantizedSGD",
]
