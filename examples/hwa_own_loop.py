"""HWA (hierarchical weight averaging) in your own loop.

    mpirun -np 2 python examples/hwa_own_loop.py --data-root ../shared/data/cifar10/cifar10_jpg.tar.xz
    (K = 2 groups of one process; -np 4 gives 2 groups of 2, data-parallel inside each)

Online: K models train on their own data orders and are replaced by their average every
H steps. Offline: the output is the mean of the last M online averages, BN recomputed.
An API demo on a small real subset (see examples/common.py), not an accuracy claim.
"""
import copy

import torch
from common import DEMO_NOTE, accuracy, load_subset, parse_args, shard_loader, small_cnn, train_epoch

from swa_lib.comm import allreduce_gradients_, init_comm
from swa_lib.methods import HWAAverager

args = parse_args(__doc__, epochs=3, extra={"--groups": 2, "--sync-period-steps": 4, "--window-cycles": 5})
train_set, test_set = load_subset(args.data_root, args.train_per_class, args.test_per_class)

# --8<-- [start:loop]
comm = init_comm()
torch.manual_seed(args.seed)
model = small_cnn()
comm.broadcast_(list(model.state_dict().values()))  # Distributed: all K models start the same
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
hwa = HWAAverager(comm, model, opt, groups=args.groups, sync_period_steps=args.sync_period_steps,
                  window_cycles=args.window_cycles)
# Each group reads the whole training set in its own order, sharded over its own processes.
loader = shard_loader(train_set, hwa.group.rank, hwa.group.size, args.batch_size,
                      seed=args.seed + 1000 * hwa.group.index)
step = 0
for epoch in range(args.epochs):
    step = train_epoch(model, opt, loader, epoch, step=step,
                       after_backward=lambda: allreduce_gradients_(comm, model, hwa.group),
                       after_step=hwa.step)   # every H steps: online average, then into the window
output = copy.deepcopy(model)
hwa.output_(output, loader)             # window mean, BN recomputed and combined over the world
# --8<-- [end:loop]

if comm.rank == 0:
    print(DEMO_NOTE)
    print(f"processes {comm.size} ({comm.backend}), {args.groups} groups, {hwa.cycles} cycles of "
          f"{args.sync_period_steps} steps: last model test acc {accuracy(model, test_set):.3f}, "
          f"HWA (mean of the last {len(hwa.window)} averages) {accuracy(output, test_set):.3f}")
comm.shutdown()
