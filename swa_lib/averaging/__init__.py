"""What every averaging method shares, for the strategies and for one's own loop.

    flat.py        the tensors an average covers, as one flat vector and back
    bn.py          bn_buffers, update_bn_ (exact over a process group), recompute_bn_ (on a
                   DataShard of the training data in one epoch's order)
    evaluation.py  evaluate: test loss and accuracy of one model, over a group (the one eval loop)
    lawa_ema.py    LAWA (ring of the last L snapshots) and EMA, with optional async pinned-CPU buffers
    hwa.py         HWAAverager: HWA's online average over K groups and its offline window
    swap.py        swap_average_: SWAP's phase 3 (world average, BN recomputed over every process);
                   import it from there or swa_lib.methods (it needs swa_lib.comm, which needs flat.py)

SWA's running mean is torch.optim.swa_utils.AveragedModel itself (swa_lib.methods.swa). LAWA's
ring and HWA's window must drop their oldest snapshot, which AveragedModel's running mean cannot.
EMA could be AveragedModel with get_ema_multi_avg_fn on the device, but not with its buffers in
pinned host memory filled asynchronously (buffer_device="cpu"), so it stays one flat-vector object
for both paths (its update costs about what AveragedModel's does: results/averaging_overhead_cpu.md).
"""
from __future__ import annotations

from swa_lib.averaging.bn import bn_buffers, recompute_bn_, update_bn_
from swa_lib.averaging.evaluation import evaluate
from swa_lib.averaging.flat import averaged_tensors, flat_parameters, load_flat_parameters_
from swa_lib.averaging.hwa import HWAAverager
from swa_lib.averaging.lawa_ema import EMA, LAWA

__all__ = ["bn_buffers", "update_bn_", "recompute_bn_", "evaluate", "averaged_tensors", "flat_parameters",
           "load_flat_parameters_", "HWAAverager", "EMA", "LAWA"]
