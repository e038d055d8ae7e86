"""Shared by the per-rank test programs: fail loudly and at once, so mpirun ends the whole job."""
from __future__ import annotations

import os
import sys
import traceback


class OracleMismatch(AssertionError):
    """A rank computed something other than its oracle."""


def check(ok: bool, message: str) -> None:
    """Raise `OracleMismatch(message)` unless `ok`."""
    if not ok:
        raise OracleMismatch(message)


def run_rank(main) -> None:
    """Call `main()`; on any error print it with the rank and leave with status 1 at once.

    os._exit skips interpreter shutdown: a normal exit would run MPI_Finalize / hvd.shutdown
    while peers still wait in a collective, which can hang instead of failing. mpirun sees
    the non-zero status and kills the other ranks.
    """
    try:
        main()
    except BaseException:  # any failure must end the job, not hang it
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "?"))
        sys.stdout.flush()
        sys.stderr.write(f"[rank {rank}] FAILED\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)
