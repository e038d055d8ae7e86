"""Classic SWA in your own loop, data-parallel over any number of processes.

    python examples/swa_own_loop.py --data-root ../shared/data/cifar10/cifar10_jpg.tar.xz
    mpirun -np 2 python examples/swa_own_loop.py --data-root ...   # Horovod, gradients averaged

An API demo on a small real subset (see examples/common.py), not an accuracy claim.
"""
import torch
from common import DEMO_NOTE, accuracy, load_subset, parse_args, shard_loader, small_cnn
from torch.optim.swa_utils import AveragedModel

from swa_lib.averaging import update_bn_
from swa_lib.comm import allreduce_gradients_, init_comm

args = parse_args(__doc__, epochs=4)
train_set, test_set = load_subset(args.data_root, args.train_per_class, args.test_per_class)
swa_start = args.epochs // 2

# --8<-- [start:loop]
comm = init_comm()                      # Horovod under mpirun, single process otherwise
torch.manual_seed(args.seed)
model = small_cnn()
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
comm.broadcast_(list(model.state_dict().values()))  # Distributed: same start everywhere
swa = AveragedModel(model)              # torch's equal running average of the snapshots
loader = shard_loader(train_set, comm.rank, comm.size, args.batch_size, args.seed)  # my shard
for epoch in range(args.epochs):
    loader.sampler.set_epoch(epoch)
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        allreduce_gradients_(comm, model)   # Distributed: mean gradient over all processes
        opt.step()
    if epoch + 1 >= swa_start:
        swa.update_parameters(model)        # one snapshot per epoch from swa_start on
update_bn_(swa, loader, comm=comm)          # BN statistics of the average, exact over all ranks
# --8<-- [end:loop]

if comm.rank == 0:
    print(DEMO_NOTE)
    print(f"processes {comm.size} ({comm.backend}): SGD test acc {accuracy(model, test_set):.3f}, "
          f"SWA of {int(swa.n_averaged)} snapshots test acc {accuracy(swa, test_set):.3f}")
comm.shutdown()
