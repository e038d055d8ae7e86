"""Per-rank program: rank 1 dies by SIGKILL while the others sit in an allreduce loop.

Usage: mpirun -np N python tests/mpi_scripts/comm_kill.py BACKEND
The job must end with a non-zero status soon after the kill. A survivor that is still
looping after SURVIVOR_LIMIT_S prints "NO ERROR" and exits 3, so a job that neither hangs
nor fails is also caught by the test.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from rank_harness import run_rank
from swa_lib.comm import init_comm

KILL_AFTER_STEPS = 5
SURVIVOR_LIMIT_S = 90


def main() -> None:
    comm = init_comm(sys.argv[1])
    print(f"STARTED rank={comm.rank}", flush=True)
    buf = torch.ones(1000)
    deadline = time.monotonic() + SURVIVOR_LIMIT_S
    step = 0
    while time.monotonic() < deadline:
        if comm.rank == 1 and step == KILL_AFTER_STEPS:
            print(f"KILLING rank={comm.rank} at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        comm.allreduce_([buf], "mean")
        step += 1
    print(f"NO ERROR rank={comm.rank} after {step} steps: the dead peer went unnoticed", flush=True)
    os._exit(3)


if __name__ == "__main__":
    run_rank(main)
