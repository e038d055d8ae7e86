"""HWA: hierarchical weight averaging, online across groups plus an offline window (Gu et al. 2023).

The dataset is a config value (data.dataset: cifar10_jpg, cifar100, tiny_imagenet), so one
entry point serves CIFAR-10, CIFAR-100 and Tiny-ImageNet:

    ./run.sh mpirun -np 4 python experiments/hwa_cifar.py --config configs/hwa/cifar10_resnet9_hwa_reduced.yaml
    ./run.sh mpirun -np 4 python experiments/hwa_cifar.py --config configs/hwa/tiny_imagenet_resnet9_hwa_reduced.yaml \
        method.groups=4 method.window_cycles=1 run.seed=1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swa_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__, default_method="hwa"))
