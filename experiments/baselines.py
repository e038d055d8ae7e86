"""SGD and classic SWA baselines (the method comes from the config's `method.name`).

    python experiments/baselines.py --config configs/baselines/cifar10_resnet9_swa_reduced.yaml
    ./run.sh mpirun -np 4 python experiments/baselines.py --config configs/... run.seed=1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swa_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__, default_method="sgd"))
