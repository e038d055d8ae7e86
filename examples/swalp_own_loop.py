"""SWALP in your own loop: train in 8-bit block floating point, average in full precision.

    python examples/swalp_own_loop.py --data-root ../shared/data/cifar10/cifar10_jpg.tar.xz

Weights, gradients and momentum are quantized by `QuantizedSGD`; activations and errors
by hooks that `insert_quantizers` puts on every Conv2d/Linear (the model's code is
unchanged). The average is torch's AveragedModel of a quantizer-free copy, once per epoch.
An API demo on a small real subset (see examples/common.py), not an accuracy claim.
"""
import torch
from common import DEMO_NOTE, accuracy, load_subset, parse_args, shard_loader, small_cnn, train_epoch
from torch.optim.swa_utils import AveragedModel

from swa_lib.averaging import update_bn_
from swa_lib.quant import BlockFloat, QuantizedSGD, insert_quantizers, quantizers_disabled, remove_quantizers

args = parse_args(__doc__, epochs=4, extra={"--bits": 8})
train_set, test_set = load_subset(args.data_root, args.train_per_class, args.test_per_class)
swa_start = args.epochs // 2

# --8<-- [start:loop]
torch.manual_seed(args.seed)
model = small_cnn()
small = BlockFloat(args.bits, "small", "stochastic")  # word length, one exponent per slice of dim 0
big = BlockFloat(args.bits, "big", "stochastic")      # one exponent per tensor (activations, errors)
generator = torch.Generator().manual_seed(args.seed)  # the stochastic rounding's noise
insert_quantizers(model, fmt_act=big, fmt_err=big, generator=generator)
opt = QuantizedSGD(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4),
                   fmt_weight=small, fmt_grad=small, fmt_momentum=small, fmt_acc=small, generator=generator)
swa = AveragedModel(model)
remove_quantizers(swa.module)           # the average computes in full precision
loader = shard_loader(train_set, 0, 1, args.batch_size, args.seed)
for epoch in range(args.epochs):
    train_epoch(model, opt, loader, epoch)
    if epoch + 1 >= swa_start:
        swa.update_parameters(model)
update_bn_(swa, loader)                 # full precision: swa has no quantizers
# --8<-- [end:loop]

print(DEMO_NOTE)
with quantizers_disabled(model):        # e.g. to look at the low-precision model in fp32
    fp32_view = accuracy(model, test_set)
print(f"{args.bits}-bit SGD test acc {accuracy(model, test_set):.3f} (quantizers off: {fp32_view:.3f}), "
      f"SWALP average of {int(swa.n_averaged)} epochs {accuracy(swa, test_set):.3f}")
