"""SWAP's phase 3 for any training loop: the world average of K workers, BN recomputed over every process."""
from __future__ import annotations

import torch

from swa_lib.averaging.bn import update_bn_
from swa_lib.comm import average_model_


def swap_average_(comm, model: torch.nn.Module, bn_batches, *, max_batches: int | None = None,
                  device: torch.device | None = None) -> torch.nn.Module:
    """SWAP's phase 3 for any loop: average `model` over the world, then recompute its BN statistics.

    Call it on every process with its own worker's model (or a copy of it), after phase 2.
    Members of a worker hold the same replica, so the world mean is the mean over workers.
    BN running statistics are not averaged but recomputed from `bn_batches`, this process's
    shard of the training data (the same number of batches on every process), and combined
    exactly over the world (swa_lib.averaging.update_bn_). Returns `model`, now the average.

        comm = init_comm(); worker = comm.split(K)        # phase 2: K independent workers
        ...; allreduce_gradients_(comm, model, worker)    # gradients stay inside the worker
        swap = swap_average_(comm, copy.deepcopy(model), my_shard_of_training_batches)
    """
    average_model_(comm, model, comm.world, buffers=False)  # Distributed: mean over the K workers
    update_bn_(model, bn_batches, comm=comm, group=comm.world, max_batches=max_batches, device=device)
    return model
