"""Every launcher a cluster user reaches for, end to end on this machine: horovodrun (MPI and
Gloo), torchrun, and Slurm's srun and sbatch through a one-node Slurm started here.

Each job runs tests/mpi_scripts/launch_probe.py, which checks the backend and world size that
init_comm("auto") picked and runs collectives against oracles; here we assert every rank said so.
(mpirun is covered by test_comm.py.)
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mpi_util import PYTHON, REPO_ROOT, assert_ranks_said, run_job

PROBE = Path(__file__).resolve().parent / "mpi_scripts" / "launch_probe.py"
BIN = Path(PYTHON).parent  # horovodrun and torchrun live beside the venv's python
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# A SWAP run small enough for a test: 2 workers of 1 process, 3 epochs (2 + 1 in phase 2).
SWAP_TINY = ["data.dataset=cifar10_jpg", "data.train_subset=128", "data.test_subset=100", "model.name=resnet9",
             "model.kwargs={width: 4}", "optim.batch_size=32", "schedule.epochs=3", "eval.batch_size=100",
             "eval.bn_update_batches=2", "run.progress=false", "method.workers=2", "method.stop_accuracy=null",
             "method.phase2_epochs=1", "method.phase2_batch_size=16"]
SWAP_CONFIG = REPO_ROOT / "configs/swap/cifar10_resnet9_swap_smoke.yaml"


def _said_all(result, np: int, backend: str, launcher: str) -> None:
    assert_ranks_said(result, np, "LAUNCHED")
    for line in (ln for ln in result.stdout.splitlines() if "LAUNCHED" in ln):
        assert f"size={np} backend={backend} launcher={launcher}" in line, result.stdout


@pytest.mark.timeout(480)
@pytest.mark.parametrize("controller, launcher", [("--mpi", "mpirun"), ("--gloo", "horovodrun")])
def test_horovodrun_gives_ranks_0_and_1_of_2(controller, launcher):
    """horovodrun starts ranks through mpirun (--mpi) or itself (--gloo, HOROVOD_RANK/SIZE)."""
    result = run_job([BIN / "horovodrun", controller, "-np", 2, "-H", "localhost:2", PYTHON, PROBE, "horovod", 2],
                     timeout_s=450, env=ONE_THREAD, cwd=PROBE.parent)
    _said_all(result, 2, "horovod", launcher)


@pytest.mark.timeout(480)
def test_torchrun_two_processes_use_the_torch_backend():
    result = run_job([BIN / "torchrun", "--standalone", "--nproc_per_node", 2, PROBE, "torch", 2],
                     timeout_s=450, env=ONE_THREAD, cwd=PROBE.parent)
    _said_all(result, 2, "torch", "torchrun")


# ---------------------------------------------------------------------------------- Slurm
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_slurm() -> str | None:
    """Install slurm-wlm from Debian if slurmctld is missing; None when done, else why not."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("srun"):
        return None
    if os.geteuid() != 0:
        return "installing slurm-wlm (apt) and running slurmd need root; this test runs as a user"
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm (slurmctld + slurmd, this host, 2 CPUs) in a temporary directory, for
    this module only. Yields the environment that points srun/sbatch/squeue at it."""
    why_not = _install_slurm()
    if why_not:
        pytest.skip(f"one-node Slurm not started: {why_not} (test_comm.py tests srun's variables)")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    # No munge: auth/none is fine for a cluster of one node that lives for one test module.
    conf.write_text(f"""ClusterName=swatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([*cmd, "-D", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True)
               for cmd in (["slurmctld"], ["slurmd", "-N", host])]
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline and state != "idle":
            time.sleep(1)
            done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
            state = done.stdout.strip()
        if state != "idle":
            logs = "".join(f"\n{p.name}: " + p.read_text()[-600:] for p in root.glob("*.log") if p.exists())
            pytest.skip(f"one-node Slurm did not come up within 60 s (sinfo: {state or done.stderr.strip()!r}){logs}")
        yield {"SLURM_CONF": str(conf)}
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for proc in daemons:  # our own two daemons, by pid
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.timeout(480)
def test_srun_with_pmix_runs_horovod_over_mpi(slurm):
    result = run_job(["srun", "--mpi=pmix", "-n", 2, PYTHON, PROBE, "horovod", 2], timeout_s=450,
                     env={**slurm, **ONE_THREAD}, cwd=PROBE.parent)
    _said_all(result, 2, "horovod", "pmix")


@pytest.mark.timeout(480)
def test_srun_without_mpi_runs_torch_at_master_addr(slurm):
    env = {**slurm, **ONE_THREAD, "SWA_COMM_BACKEND": "torch", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    result = run_job(["srun", "-n", 2, PYTHON, PROBE, "torch", 2], timeout_s=450, env=env, cwd=PROBE.parent)
    _said_all(result, 2, "torch", "srun")


@pytest.mark.timeout(900)
def test_sbatch_chain_of_jobs_ends_with_the_uninterrupted_weights(slurm, tmp_path):
    """examples/slurm/swap_chain.sbatch: a job of 2 epochs, then one of 1 == one srun of all 3."""
    whole = tmp_path / "whole"
    run_job(["srun", "--mpi=pmix", "-n", 2, PYTHON, REPO_ROOT / "experiments/swap_cifar.py", "--config",
             SWAP_CONFIG, "--run-dir", whole, *SWAP_TINY], timeout_s=450, env={**slurm, **ONE_THREAD})
    chain = tmp_path / "chain"
    env = {**slurm, **ONE_THREAD, "CONFIG": str(SWAP_CONFIG), "RUN_DIR": str(chain), "EPOCHS_PER_JOB": "2",
           "SWA_REPO": str(REPO_ROOT), "SBATCH_OUTPUT": str(tmp_path / "job-%j.out")}
    submitted = run_job(["sbatch", "--ntasks=2", "--parsable", REPO_ROOT / "examples/slurm/swap_chain.sbatch",
                         *SWAP_TINY], timeout_s=60, env=env)
    first_job = int(submitted.stdout.strip().split(";")[0])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # done when no job of the chain is queued or running
        queue = run_job(["squeue", "-h", "-o", "%i"], timeout_s=30, env=slurm).stdout.split()
        if not queue:
            break
        time.sleep(3)
    logs = {p.name: p.read_text() for p in sorted(tmp_path.glob("job-*.out"))}
    shown = "\n".join(f"--- {name}\n{text[-1500:]}" for name, text in logs.items())
    assert not queue, f"the chain still had jobs {queue} after 600 s\n{shown}"
    assert (chain / "summary.json").exists(), f"the chain did not finish the run\n{shown}"
    # Two jobs: the first paused after epoch 2 and submitted the second, which resumed and finished.
    assert sorted(logs) == [f"job-{first_job + k}.out" for k in range(2)], shown
    first, second = (logs[f"job-{first_job + k}.out"] for k in range(2))
    assert "paused after epoch 2" in first and "resumed" not in first, shown
    assert "resumed from epoch 2" in second and "done:" in second and "paused" not in second, shown
    for name in ("final_model.pt", "final_train_model.pt"):
        a, b = torch.load(whole / name), torch.load(chain / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the chain's weights differ from one run's"
