"""Name -> constructor registry, so configs can name a model as a string."""

from collections.abc import Callable

import torch.nn as nn

ModelBuilder = Callable[..., nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that makes a builder available to `build_model` under `name`.

    Args:
        name: the config name, e.g. "resnet9". Must be unused.

    The builder is called as `builder(num_classes, **kwargs)` and returns a module.
    """
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(
                f"model name {name!r} is already registered "
                f"(by {_BUILDERS[name].__module__}.{_BUILDERS[name].__name__})")
        _BUILDERS[name] = builder
        return builder
    return decorate


def available_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_BUILDERS)


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a freshly initialised model by its registered name.

    Args:
        name: one of `available_models()`.
        num_classes: size of the output layer, a positive int.
        **kwargs: model-specific options (e.g. `width` for resnet9); an option the
            model does not take raises TypeError from the builder.

    Initialisation draws only from torch's global RNG, so the same
    `torch.manual_seed` gives the same weights.
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown model name {name!r}; expected one of {available_models()}")
    # bool is an int subclass; a True here is a config mistake, not 1 class.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return _BUILDERS[name](num_classes, **kwargs)
