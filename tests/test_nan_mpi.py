"""A NaN loss on one rank only, through the real entry point under mpirun and under torchrun:
the job ends soon after, the message names the rank and the step, the last checkpoint is intact."""
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mpi_util import MPIRUN, PYTHON, REPO_ROOT, _show

SCRIPT = Path(__file__).parent / "mpi_scripts" / "nan_rank.py"
CONFIG = REPO_ROOT / "configs" / "baselines" / "cifar10_resnet9_sgd_smoke.yaml"
# 256 images over 2 ranks at 32 each: 4 steps per epoch, so step 6 lies inside epoch 2.
TINY = ["data.train_subset=256", "data.test_subset=100", "model.kwargs={width: 4}", "optim.batch_size=32",
        "schedule.epochs=3", "eval.batch_size=100", "eval.bn_update_batches=1", "run.progress=false",
        "run.log_every_steps=1"]
BAD_RANK, BAD_STEP = 1, 6


def launch(launcher: str, bad_step: int, run_dir: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run 2 ranks; return the finished job and the time it ended."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [str(SCRIPT), str(BAD_RANK), str(bad_step), "--config", str(CONFIG), "--run-dir", str(run_dir), *TINY,
            *extra]
    if launcher == "mpirun":
        cmd = [*MPIRUN, "-np", "2", "-x", "PYTHONPATH", PYTHON, *args, "dist.backend=horovod"]
    else:
        env["SWA_TORCH_BACKEND"] = "gloo"
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
               "dist.backend=torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=450, env=env, cwd=REPO_ROOT)
    return proc, time.time()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(950)
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_nan_loss_on_one_rank_ends_the_job_naming_rank_and_step(tmp_path, launcher):
    run_dir = tmp_path / "run"
    ok, _ = launch(launcher, 0, run_dir, "run.stop_after_epochs=1")
    assert ok.returncode == 0, _show(ok)
    ckpt = run_dir / "checkpoints"
    pointer = json.loads((ckpt / "latest.json").read_text())
    files = {r: ckpt / pointer["tag"] / f"rank{r}.pt" for r in range(2)}
    before = {r: _sha(f) for r, f in files.items()}

    bad, ended = launch(launcher, BAD_STEP, run_dir)
    assert bad.returncode != 0, _show(bad)
    injected = re.search(rf"NAN_INJECTED t=([\d.]+) rank={BAD_RANK} step={BAD_STEP}", bad.stdout)
    assert injected, _show(bad)
    assert ended - float(injected[1]) < 60, f"the job took {ended - float(injected[1]):.0f} s to end\n{_show(bad)}"
    assert (f"error (rank {BAD_RANK}): NonFiniteLossError: training loss is nan at step {BAD_STEP}"
            in bad.stderr), _show(bad)
    assert json.loads((ckpt / "latest.json").read_text()) == pointer
    for r, f in files.items():
        assert _sha(f) == before[r], f"rank {r}'s last checkpoint changed"
        assert torch.load(f, weights_only=False)["epoch"] == 1
