"""Activation and error quantizers, put into any model without editing its code.

SWALP: the input of every Conv2d / Linear is quantized in the forward pass
(activations) and the gradient flowing back through that point is quantized in the
backward pass (errors). The official code instead calls a quantizer module inside its
own model definitions. VGG: after each ReLU, the same point up to the max pooling or
dropout in between (with nearest rounding, pooling then quantizing equals quantizing
then pooling: same block max, monotone rounding; stochastic rounding and dropout make
them differ slightly). PreResNet: before and after every conv in the residual blocks
and after the stem conv; `insert_quantizers(..., outputs=True)` covers the "after".
The official models leave the image (input of the first conv) in full precision;
pass `exclude=("name.of.first.conv",)` to do the same. `insert_quantizers_at` takes
the points one by one; swa_lib.quant.placement names the official placements.
"""

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from swa_lib.quant.number import BlockFloat, check_format
from swa_lib.quant.quantize import quantize

QUANTIZED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
_ATTRIBUTE = "input_quantizer"  # child names on each quantized layer
_OUTPUT_ATTRIBUTE = "output_quantizer"


class _QuantizeActivationError(torch.autograd.Function):
    """Forward: quantize x with fmt_act. Backward: quantize the incoming gradient with
    fmt_err and pass it on (straight-through: the rounding itself has no gradient)."""

    @staticmethod
    def forward(ctx, x, fmt_act, fmt_err, generator, fused):
        ctx.fmt_err = fmt_err
        ctx.generator = generator
        ctx.fused = fused
        if fmt_act is None:
            return x.view_as(x)  # a new tensor object, as autograd.Function needs
        return quantize(x, fmt_act, generator, fused)

    @staticmethod
    def backward(ctx, grad_output):
        return quantize(grad_output, ctx.fmt_err, ctx.generator, ctx.fused), None, None, None, None


def quantize_activation_error(x: torch.Tensor, fmt_act: BlockFloat | None,
                              fmt_err: BlockFloat | None,
                              generator: torch.Generator | None = None,
                              fused: bool = False) -> torch.Tensor:
    """Quantize x with fmt_act now and its gradient with fmt_err in the backward pass.

    Args:
        x: activation tensor; its dim 0 is the sample (one exponent per sample for
            "small" blocks).
        fmt_act, fmt_err: formats; None leaves that direction in full precision.
        generator: stochastic-rounding noise source for both directions.
        fused: use the compiled kernels of `quantize(..., fused=True)`.
    """
    if fmt_act is None and fmt_err is None:
        return x
    return _QuantizeActivationError.apply(x, fmt_act, fmt_err, generator, fused)


class ActivationErrorQuantizer(nn.Module):
    """Identity-shaped module: quantizes activations forward and errors backward.

    Args:
        fmt_act: format of the activations (forward); None = full precision.
        fmt_err: format of the errors (backward); None = full precision.
        generator: optional torch.Generator for reproducible stochastic rounding.
        fused: use the compiled kernels of `quantize(..., fused=True)`.

    `enabled = False` makes it the exact identity (see `quantizers_disabled`). It has
    no parameters or buffers, so a model's state_dict is the same with or without it.
    The generator must live on the activations' device. A NaN or inf error raises
    ValueError in the backward pass (see `quantize`).
    """

    def __init__(self, fmt_act: BlockFloat | None, fmt_err: BlockFloat | None,
                 generator: torch.Generator | None = None, fused: bool = False):
        super().__init__()
        self.fmt_act = check_format(fmt_act, "fmt_act")
        self.fmt_err = check_format(fmt_err, "fmt_err")
        self.generator = generator
        self.fused = fused
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return quantize_activation_error(x, self.fmt_act, self.fmt_err, self.generator,
                                         self.fused)

    def extra_repr(self) -> str:
        fused = ", fused" if self.fused else ""
        return f"act={self.fmt_act}, err={self.fmt_err}{fused}, enabled={self.enabled}"


class ActivationQuantizer(ActivationErrorQuantizer):
    """Quantizes activations in the forward pass only."""

    def __init__(self, fmt_act: BlockFloat | None,
                 generator: torch.Generator | None = None, fused: bool = False):
        super().__init__(fmt_act, None, generator, fused)


class ErrorQuantizer(ActivationErrorQuantizer):
    """Quantizes errors (gradients) in the backward pass only."""

    def __init__(self, fmt_err: BlockFloat | None,
                 generator: torch.Generator | None = None, fused: bool = False):
        super().__init__(None, fmt_err, generator, fused)


def _quantize_input_hook(layer: nn.Module, args: tuple) -> tuple:
    # A plain function, not a closure: deepcopy (AveragedModel) keeps it pointing at
    # the copied layer's own quantizer, which the copy receives as a child.
    quantizer = getattr(layer, _ATTRIBUTE, None)
    if quantizer is None:
        return args
    return (quantizer(args[0]),) + tuple(args[1:])


def _quantize_output_hook(layer: nn.Module, args: tuple, output: torch.Tensor):
    quantizer = getattr(layer, _OUTPUT_ATTRIBUTE, None)
    return output if quantizer is None else quantizer(output)


def insert_quantizers(model: nn.Module, fmt_act: BlockFloat | None,
                      fmt_err: BlockFloat | None,
                      generator: torch.Generator | None = None,
                      layer_types: tuple[type[nn.Module], ...] = QUANTIZED_LAYER_TYPES,
                      exclude: Iterable[str] = (), outputs: bool = False,
                      fused: bool = False) -> nn.Module:
    """Quantize the input (forward) and input gradient (backward) of every layer of
    `layer_types` in `model`, in place; returns the model.

    Args:
        model: any nn.Module; its code is not edited.
        fmt_act, fmt_err: formats of activations and errors; None = full precision.
        generator: optional torch.Generator shared by all the quantizers.
        layer_types: which layers get a quantized input (default Conv2d and Linear).
        exclude: qualified names (as in `model.named_modules()`) to leave alone.
        outputs: also quantize each such layer's output forward and the error arriving
            at it backward (child `output_quantizer`, forward hook), as the official
            PreResNet does around its convs.
        fused: quantize with the compiled kernels of `quantize(..., fused=True)`.

    How: each layer gets a child `input_quantizer` (an ActivationErrorQuantizer) and a
    forward pre-hook that runs it on the layer's input. Hooks rather than wrapping,
    because wrapping renames parameters ("conv.weight" -> "conv.1.weight") and breaks
    checkpoints and weight averaging across quantized / full-precision copies; the
    child holds no tensors, so state_dict keys and values are unchanged.

    Example:
        >>> big8 = BlockFloat(8, "big", "stochastic")  # as the official code runs
        >>> insert_quantizers(model, fmt_act=big8, fmt_err=big8)
        >>> with quantizers_disabled(model):  # e.g. BN recompute in full precision
        ...     model(images)
    """
    excluded = set(exclude)
    names = {name for name, _ in model.named_modules()}
    unknown = excluded - names
    if unknown:
        raise ValueError(f"insert_quantizers: exclude names {sorted(unknown)} are not "
                         f"modules of the model; expected names from named_modules()")
    targets = [name for name, layer in model.named_modules()
               if isinstance(layer, layer_types) and name not in excluded]
    return insert_quantizers_at(model, fmt_act, fmt_err, inputs=targets,
                                outputs=targets if outputs else (), generator=generator,
                                fused=fused)


def insert_quantizers_at(model: nn.Module, fmt_act: BlockFloat | None,
                         fmt_err: BlockFloat | None, inputs: Iterable[str] = (),
                         outputs: Iterable[str] = (),
                         generator: torch.Generator | None = None,
                         fused: bool = False) -> nn.Module:
    """Quantize the input of each module named in `inputs` and the output of each one
    named in `outputs` (activations forward, errors backward), in place; returns the model.

    Names are qualified names from `model.named_modules()`. The same mechanism as
    `insert_quantizers` (child quantizers plus hooks), for placements that name their
    points one by one, such as the official SWALP models' (swa_lib.quant.placement).
    A module called several times per forward (a shared ReLU) is quantized at every call.
    """
    check_format(fmt_act, "fmt_act")
    check_format(fmt_err, "fmt_err")
    modules = dict(model.named_modules())
    inputs, outputs = list(inputs), list(outputs)
    unknown = sorted(set(inputs + outputs) - set(modules))
    if unknown:
        raise ValueError(f"insert_quantizers_at: {unknown} are not modules of the model; "
                         f"expected names from named_modules()")
    for names, attribute in ((inputs, _ATTRIBUTE), (outputs, _OUTPUT_ATTRIBUTE)):
        for name in names:
            if hasattr(modules[name], attribute):
                raise RuntimeError(f"layer {name!r} already has an {attribute}; "
                                   f"call remove_quantizers(model) first")
    for name in inputs:
        modules[name].add_module(_ATTRIBUTE, ActivationErrorQuantizer(fmt_act, fmt_err, generator, fused))
        modules[name].register_forward_pre_hook(_quantize_input_hook)
    for name in outputs:
        modules[name].add_module(_OUTPUT_ATTRIBUTE,
                                 ActivationErrorQuantizer(fmt_act, fmt_err, generator, fused))
        modules[name].register_forward_hook(_quantize_output_hook)
    return model


def quantization_points(model: nn.Module) -> list[tuple[str, str]]:
    """Where `model` quantizes: (module name, "input" or "output") pairs, in module order."""
    points = []
    for name, module in model.named_modules():
        for attribute, where in ((_ATTRIBUTE, "input"), (_OUTPUT_ATTRIBUTE, "output")):
            if isinstance(getattr(module, attribute, None), ActivationErrorQuantizer):
                points.append((name, where))
    return points


def remove_quantizers(model: nn.Module) -> nn.Module:
    """Undo `insert_quantizers` in place (also on a deepcopy of such a model)."""
    for layer in list(model.modules()):
        for name, hooks, hook_fn in (
                (_ATTRIBUTE, layer._forward_pre_hooks, _quantize_input_hook),
                (_OUTPUT_ATTRIBUTE, layer._forward_hooks, _quantize_output_hook)):
            if not isinstance(getattr(layer, name, None), ActivationErrorQuantizer):
                continue
            delattr(layer, name)
            # As torch.nn.utils.prune.remove does: a deepcopy has no handle to call.
            for hook_id, hook in list(hooks.items()):
                if hook is hook_fn:
                    del hooks[hook_id]
    return model


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every ActivationErrorQuantizer in `model` on or off."""
    for module in model.modules():
        if isinstance(module, ActivationErrorQuantizer):
            module.enabled = bool(enabled)


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in full precision inside the block, e.g. SWA's BN recompute.

    Restores each quantizer's previous state on exit, even after an exception.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActivationErrorQuantizer)]
    previous = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = False
        yield model
    finally:
        for q, was_enabled in zip(quantizers, previous):
            q.enabled = was_enabled
