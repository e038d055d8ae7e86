"""Weight initialisation shared by the CIFAR models of the SWA/SWALP papers' code."""
import torch.nn as nn


def kaiming_fan_out_(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convs; BN weight 1 and bias 0. In place."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
