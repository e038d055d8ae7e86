"""Which launcher started this process, which communication backend that implies, and its device.

Read from the environment alone (no MPI or torch.distributed call), so --dry-run and the
entry points can ask before any backend starts; swa_lib.comm starts the backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "horovod", "torch", "single")


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher's environment says about this process (None where it says nothing)."""
    launcher: str | None  # "torchrun", "horovodrun" (--gloo), "mpirun", "pmi", "pmix", "srun" or None
    rank: int | None = None
    size: int | None = None
    local_rank: int | None = None
    local_size: int | None = None


def detect_launch(env=None) -> LaunchInfo:
    """Read rank and size from torchrun, horovodrun --gloo, Open MPI, PMI (MPICH, Intel MPI), PMIx or
    Slurm srun variables. horovodrun with MPI (its default) starts the ranks through mpirun."""
    env = os.environ if env is None else env
    num = lambda key: int(env[key]) if key and env.get(key, "").strip().isdigit() else None  # noqa: E731
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= env.keys():
        return LaunchInfo("torchrun", *map(num, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")))
    table = [("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
             ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
              "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
             ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
             ("pmix", "PMIX_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
             # SLURM_STEP_NUM_TASKS is set by srun, not in a batch script's own shell. Tasks per
             # node is a plain number only when every node runs as many ("2(x3)" reads as None).
             ("srun", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE")]
    for launcher, rank_key, size_key, local_rank_key, local_size_key in table:
        if rank_key in env:
            rank = num("SLURM_PROCID" if launcher == "srun" else rank_key)
            return LaunchInfo(launcher, rank, num(size_key), num(local_rank_key), num(local_size_key))
    return LaunchInfo(None)


def resolve_backend(backend: str, launch: LaunchInfo) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"communication backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    chosen = os.environ.get("SWA_COMM_BACKEND")
    if chosen and chosen not in BACKENDS[1:]:
        raise ValueError(f"SWA_COMM_BACKEND={chosen!r} is not one of {BACKENDS[1:]}")
    if chosen:
        return chosen
    if launch.launcher == "torchrun":
        return "torch"
    if launch.launcher is not None and (launch.size is None or launch.size > 1):
        return "horovod"
    return "single"


def pick_device(cfg, comm) -> torch.device:
    want = cfg.run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda, but torch sees no GPU here; use run.device=cpu")
        return torch.device("cuda", comm.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
