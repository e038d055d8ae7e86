"""LAWA and EMA (Ajroldi et al. 2025): plain SGD with weight averages evaluated on the side.

    python experiments/averaging_cifar.py --config configs/averaging/cifar10_resnet9_lawa_reduced.yaml
    ./run.sh mpirun -np 2 python experiments/averaging_cifar.py --config configs/averaging/... run.seed=1
    ./run.sh reproduce averaging      # time to target, window sweep, LR decay -> results/averaging_cifar10_reduced.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swa_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__, default_method="lawa"))
