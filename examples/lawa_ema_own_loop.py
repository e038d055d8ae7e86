"""LAWA and EMA weight averages in your own loop (one process; they never touch training).

    python examples/lawa_ema_own_loop.py --data-root ../shared/data/cifar10/cifar10_jpg.tar.xz

LAWA: the mean of the last L snapshots, one every nu steps. EMA: an exponential moving
average updated every nu steps. Both keep one flat vector (not torch's AveragedModel: an
update is one copy or one lerp; see swa_lib/averaging/lawa_ema.py), and are read into a
copy of the model for evaluation.
An API demo on a small real subset (see examples/common.py), not an accuracy claim.
"""
import copy

import torch
from common import DEMO_NOTE, accuracy, load_subset, parse_args, shard_loader, small_cnn, train_epoch

from swa_lib.methods import EMA, LAWA

args = parse_args(__doc__, epochs=3, extra={"--every-steps": 4, "--window": 5, "--decay": 0.9})
train_set, test_set = load_subset(args.data_root, args.train_per_class, args.test_per_class)

# --8<-- [start:loop]
torch.manual_seed(args.seed)
model = small_cnn()
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
lawa = LAWA(model, every_steps=args.every_steps, window=args.window)  # mean of the last `window` snapshots
ema = EMA(model, every_steps=args.every_steps, decay=args.decay)      # theta_ema <- d theta_ema + (1-d) theta


def update_averages(step):
    lawa.update(model, step)            # a snapshot when step % every_steps == 0; reads the model only
    ema.update(model, step)


loader = shard_loader(train_set, 0, 1, args.batch_size, args.seed)
step = 0
for epoch in range(args.epochs):
    step = train_epoch(model, opt, loader, epoch, step=step, after_step=update_averages)
lawa_model, ema_model = copy.deepcopy(model), copy.deepcopy(model)
if lawa.ready:                          # once the queue holds `window` snapshots
    lawa.copy_to(lawa_model)            # parameters and BN statistics, averaged
ema.copy_to(ema_model)
# --8<-- [end:loop]

print(DEMO_NOTE)
print(f"{step} steps: model test acc {accuracy(model, test_set):.3f}, LAWA (ready={lawa.ready}) "
      f"{accuracy(lawa_model, test_set):.3f}, EMA {accuracy(ema_model, test_set):.3f}")
