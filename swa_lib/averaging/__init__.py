"""What every averaging method shares: BN recompute over a group and the one evaluation loop.

    bn.py          bn_buffers, update_bn_ (exact over a process group), recompute_bn_ (on a
                   DataShard of the training data in one epoch's order)
    evaluation.py  evaluate: test loss and accuracy of one model, over a group
"""
from __future__ import annotations

from swa_lib.averaging.bn import bn_buffers, recompute_bn_, update_bn_
from swa_lib.averaging.evaluation import evaluate

__all__ = ["bn_buffers", "update_bn_", "recompute_bn_", "evaluate"]
