"""SWALP: SWA of a model trained in 8-bit block floating point (Yang et al. 2019).

    python experiments/swalp_cifar.py --config configs/swalp/cifar10_vgg16_swalp_paper.yaml
    ./run.sh mpirun -np 4 python experiments/swalp_cifar.py --config configs/swalp/... run.seed=1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swa_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__, default_method="swalp"))
