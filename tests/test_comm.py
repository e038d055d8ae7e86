"""swa_lib.comm under a real mpirun (2 and 4 ranks, Horovod and torch.distributed) and alone.

The per-rank programs in tests/mpi_scripts/ check their own oracles and exit non-zero on a
mismatch; here we assert the job succeeded and that every rank reported OK.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mpi_util import assert_ranks_said, run_mpi
from swa_lib.comm import (
    BACKENDS,
    LaunchInfo,
    SingleProcess,
    allreduce_gradients_,
    average_model_,
    detect_launch,
    init_comm,
    resolve_backend,
)

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
LAUNCHER_VARS = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK",
                 "SLURM_STEP_NUM_TASKS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "HOROVOD_RANK",
                 "SWA_COMM_BACKEND"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("np", [2, 4])
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_collectives_groups_and_training_match_oracles(backend, np):
    """Oracles 1-4: allreduce/broadcast values, split groups, data-parallel == big batch, sync switch."""
    result = run_mpi(np, SCRIPTS / "comm_oracles.py", [backend], timeout_s=180)
    assert_ranks_said(result, np, "OK")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_killed_rank_ends_the_job_instead_of_hanging(backend):
    """Oracle 5: SIGKILL on rank 1 while ranks 0 and 2 allreduce ends mpirun non-zero within 60 s."""
    start = time.monotonic()
    result = run_mpi(3, SCRIPTS / "comm_kill.py", [backend], timeout_s=60, check=False)
    elapsed_s = time.monotonic() - start
    assert_ranks_said(result, 3, "STARTED")  # the kill came mid-run, not during start-up
    assert "KILLING rank=1" in result.stdout, result.stdout + result.stderr
    assert "NO ERROR" not in result.stdout, result.stdout
    assert result.returncode != 0, f"job with a killed rank exited 0 after {elapsed_s:.0f} s"
    assert elapsed_s < 60


def test_unknown_backend_names_it_and_the_choices():
    with pytest.raises(ValueError, match="'nope'") as err:
        init_comm("nope")
    assert all(name in str(err.value) for name in BACKENDS)


def test_missing_horovod_says_how_to_build_it(monkeypatch):
    # An environment without Horovod: the import fails as it would there.
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(RuntimeError, match="tools/build_horovod.sh"):
        init_comm("horovod")


def test_single_process_backend_is_the_identity(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    comm = init_comm()  # auto, with no launcher: the single-process backend
    assert isinstance(comm, SingleProcess) and (comm.rank, comm.size, comm.local_size) == (0, 1, 1)
    assert comm.split(1) is comm.world and comm.world.ranks == (0,)
    with pytest.raises(ValueError, match=r"1.*3|3.*1"):
        comm.split(3)
    tensors = [torch.randn(3, 4), torch.randn(4, 3).t(), torch.arange(5)]
    originals = [t.clone() for t in tensors]
    for op in ("sum", "max"):
        comm.allreduce_(tensors, op)
    comm.allreduce_(tensors[:2], "mean")
    comm.broadcast_(tensors, root=0)
    assert tensors and all(torch.equal(t, o) for t, o in zip(tensors, originals, strict=True))
    assert comm.allgather_object({"acc": 0.5}) == [{"acc": 0.5}]
    comm.barrier()

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model(torch.randn(8, 4))[:, 0].sum().backward()  # the last layer's bias gets no grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    average_model_(comm, model)
    allreduce_gradients_(comm, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for g, p in zip(grads, model.parameters(), strict=True):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)  # a lone loop runs unchanged
    comm.shutdown()
    comm.shutdown()


@pytest.mark.parametrize("env, expected, backend", [
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, LaunchInfo("mpirun", 2, 4, 0, 2), "horovod"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}, LaunchInfo("mpirun", 0, 1), "single"),
    ({"PMI_RANK": "1", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"},
     LaunchInfo("pmi", 1, 8, 1, 4), "horovod"),
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"},
     LaunchInfo("srun", 3, 4, 1), "horovod"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2"},
     LaunchInfo("srun", 1, 4, 1, 2), "horovod"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "5", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"},
     LaunchInfo("srun", 1, 5, 1, None), "horovod"),  # nodes with different task counts
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, LaunchInfo(None), "single"),  # sbatch's own shell
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2",
      "HOROVOD_CONTROLLER": "gloo"}, LaunchInfo("horovodrun", 1, 2, 1, 2), "horovod"),  # horovodrun --gloo
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "x"},
     LaunchInfo("torchrun", 1, 2, 1, 2), "torch"),
    ({}, LaunchInfo(None), "single"),
])
def test_launcher_variables_pick_rank_size_and_backend(monkeypatch, env, expected, backend):
    monkeypatch.delenv("SWA_COMM_BACKEND", raising=False)
    launch = detect_launch(env)
    assert launch == expected
    assert resolve_backend("auto", launch) == backend
    monkeypatch.setenv("SWA_COMM_BACKEND", "torch")
    assert resolve_backend("auto", launch) == "torch"
    assert resolve_backend("single", launch) == "single"
