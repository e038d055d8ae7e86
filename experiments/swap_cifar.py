"""SWAP on CIFAR-10 / CIFAR-100 (Gupta et al., ICLR 2020): large-batch phase, independent workers, average.

    ./run.sh mpirun -np 8 python experiments/swap_cifar.py --config configs/swap/cifar10_resnet9_swap_paper.yaml
    ./run.sh mpirun -np 4 python experiments/swap_cifar.py --config configs/swap/cifar10_resnet9_swap_reduced.yaml
The SB and LB baselines run through this script too (their configs set method.name: sgd).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swa_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__, default_method="swap"))
