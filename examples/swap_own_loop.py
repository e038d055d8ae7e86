"""SWAP's three phases in a plain PyTorch loop, with the groups from `comm.split`.

    mpirun -np 4 python examples/swap_own_loop.py --data-root ../shared/data/cifar10/cifar10_jpg.tar.xz
    (2 workers of 2 processes; -np 2 gives 2 workers of one process each)

Phase 1: every process trains one model data-parallel with the large global batch.
Phase 2: `comm.split(K)` makes K workers; each continues from the phase-1 weights on its
own data order with a small batch, averaging gradients only inside itself.
Phase 3: `swap_average_` averages the K workers and recomputes BN over every process.
An API demo on a small real subset (see examples/common.py), not an accuracy claim.
"""
import copy

import torch
from common import DEMO_NOTE, accuracy, load_subset, parse_args, shard_loader, small_cnn, train_epoch

from swa_lib.comm import allreduce_gradients_, init_comm
from swa_lib.methods import swap_average_

args = parse_args(__doc__, epochs=3, batch_size=64, lr=0.1,
                  extra={"--workers": 2, "--phase2-epochs": 2, "--phase2-batch-size": 16, "--phase2-lr": 0.02})
train_set, test_set = load_subset(args.data_root, args.train_per_class, args.test_per_class)

# --8<-- [start:loop]
comm = init_comm()
torch.manual_seed(args.seed)
model = small_cnn()
comm.broadcast_(list(model.state_dict().values()))  # Distributed: one starting point
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

# Phase 1: large batch, gradients averaged over the whole world.
loader = shard_loader(train_set, comm.rank, comm.size, args.batch_size, args.seed)
for epoch in range(args.epochs):
    train_epoch(model, opt, loader, epoch, after_backward=lambda: allreduce_gradients_(comm, model))

# Phase 2: K independent workers (contiguous blocks of ranks), small batches, own data order.
worker = comm.split(args.workers)       # every rank creates every group, in the same order
for group in opt.param_groups:
    group["lr"] = args.phase2_lr
loader = shard_loader(train_set, worker.rank, worker.size, args.phase2_batch_size,
                      seed=args.seed + 1000 * (worker.index + 1))
for epoch in range(args.phase2_epochs):
    train_epoch(model, opt, loader, epoch, after_backward=lambda: allreduce_gradients_(comm, model, worker))

# Phase 3: the workers' average, BN recomputed on training data sharded over every process.
bn_loader = shard_loader(train_set, comm.rank, comm.size, args.batch_size, args.seed)
swap = swap_average_(comm, copy.deepcopy(model), bn_loader)
# --8<-- [end:loop]

# A worker's members share weights but not BN running statistics (each saw its own shard),
# so each worker is reported by its first member.
worker_acc = comm.allgather_object((worker.index, worker.rank, accuracy(model, test_set)))
if comm.rank == 0:
    print(DEMO_NOTE)
    accs = ", ".join(f"worker {k} {acc:.3f}" for k, member, acc in sorted(worker_acc) if member == 0)
    print(f"processes {comm.size} ({comm.backend}), {args.workers} workers of {worker.size}: "
          f"test acc {accs}; SWAP average {accuracy(swap, test_set):.3f}")
comm.shutdown()
