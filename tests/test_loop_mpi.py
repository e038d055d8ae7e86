"""The training loop under real mpirun, both backends, against single-process oracles."""
from pathlib import Path

import pytest

from mpi_util import assert_ranks_said, run_mpi

SCRIPT = Path(__file__).parent / "mpi_scripts" / "loop_oracles.py"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend, np", [("horovod", 2), ("torch", 2), ("horovod", 4)])
def test_data_parallel_loop_equals_one_process_with_the_global_batch(tmp_path, backend, np):
    result = run_mpi(np, SCRIPT, [backend, tmp_path], timeout_s=380)
    assert_ranks_said(result, np, "LOOP_ORACLES_OK")
