"""SWAP on ImageNet-style class folders (ImageNet; Tiny-ImageNet here) with ResNet-50 or ResNet-18.

    ./run.sh mpirun -np 8 python experiments/swap_imagenet.py --config configs/swap/imagenet_resnet50_swap_paper.yaml
The SB and LB baselines run through this script too (their configs set method.name: sgd).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swa_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__, default_method="swap"))
