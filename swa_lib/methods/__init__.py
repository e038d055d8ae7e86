"""Method registry: a method is a config dataclass plus a Strategy subclass.

Adding a method means writing those two and calling `register`; the training loop
does not change.
"""
from __future__ import annotations

from swa_lib.averaging.hwa import HWAAverager
from swa_lib.averaging.lawa_ema import EMA, LAWA
from swa_lib.averaging.swap import swap_average_
from swa_lib.methods.base import DataShard, EvalTarget, SGDConfig, Strategy
from swa_lib.methods.hwa import HWA, HWAConfig
from swa_lib.methods.lawa_ema import AveragesConfig, EMAConfig, LAWAConfig, WeightAverages
from swa_lib.methods.swa import SWA, SWAConfig
from swa_lib.methods.swalp import SWALP, SWALPConfig
from swa_lib.methods.swap import SWAP, SWAPConfig

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(config_cls: type, strategy_cls: type) -> None:
    """Make `config_cls.name` selectable as `method.name` in configs."""
    _REGISTRY[config_cls.name] = (config_cls, strategy_cls)


def method_config_class(name: str) -> type:
    if name not in _REGISTRY:
        raise KeyError(f"{name!r} is not a known method; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def build_strategy(cfg) -> Strategy:
    return _REGISTRY[cfg.method.name][1](cfg)


register(SGDConfig, Strategy)
register(SWAConfig, SWA)
register(SWALPConfig, SWALP)
register(SWAPConfig, SWAP)
register(HWAConfig, HWA)
register(LAWAConfig, WeightAverages)
register(EMAConfig, WeightAverages)
register(AveragesConfig, WeightAverages)

__all__ = ["Strategy", "DataShard", "EvalTarget", "SGDConfig", "SWA", "SWAConfig", "SWALP", "SWALPConfig", "SWAP",
           "SWAPConfig",
           "register", "build_strategy", "method_config_class", "HWA", "HWAConfig", "HWAAverager", "swap_average_",
           "LAWA", "EMA",
           "WeightAverages", "LAWAConfig", "EMAConfig", "AveragesConfig"]
