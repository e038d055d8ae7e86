"""Model zoo for the weight-averaging experiments (SPEC section 6).

Use `build_model(name, num_classes, **kwargs)`; `available_models()` lists names.
Importing the model modules below is what registers them.
"""

from models import preresnet, resnet9, torchvision_resnet, vgg, wide_resnet  # noqa: F401  (registers)
from models.registry import available_models, build_model, register

__all__ = ["available_models", "build_model", "register"]
