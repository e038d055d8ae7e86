"""Model zoo for the weight-averaging experiments (SPEC section 6).

Use `build_model(name, num_classes, **kwargs)`; `available_models()` lists names.
Importing the model modules below is what registers them.
"""

from .registry import available_models, build_model, register
from . import resnet9, preresnet, vgg, wide_resnet, torchvision_resnet  # noqa: F401  (registers)

__all__ = ["available_models", "build_model", "register"]
