"""Per-rank program for the launcher tests: what init_comm("auto") sees, then real collectives.

Usage: LAUNCHER ... python tests/mpi_scripts/launch_probe.py EXPECTED_BACKEND EXPECTED_SIZE
Checks the backend and world size that auto-detection picked, then allreduce/broadcast/
allgather_object over the world and over two split groups against oracles every rank computes
itself. Prints "LAUNCHED rank=R size=S backend=B launcher=L local=LR/LS" at the end.
"""
from __future__ import annotations

import sys

from comm_oracles import check_collectives
from rank_harness import check, run_rank
from swa_lib.comm import detect_launch, init_comm


def main() -> None:
    backend, size = sys.argv[1], int(sys.argv[2])
    comm = init_comm("auto")
    launcher = detect_launch().launcher
    check(comm.backend == backend, f"auto picked backend {comm.backend!r} under {launcher}, expected {backend!r}")
    check(comm.size == size, f"world size {comm.size} under {launcher}, expected {size}")
    check_collectives(comm, comm.world, seed=10, tag="world")
    check_collectives(comm, comm.split(2), seed=20, tag="split(2)")
    print(f"LAUNCHED rank={comm.rank} size={comm.size} backend={comm.backend} launcher={launcher} "
          f"local={comm.local_rank}/{comm.local_size}", flush=True)
    comm.shutdown()


if __name__ == "__main__":
    run_rank(main)
