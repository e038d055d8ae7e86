"""The CPU rehearsal of benchmarks/swap_paper_gpu.py (issue 16): the script a GPU lease runs in one call.

It runs the same three entry-point launches as on the GPU (SB, LB, SWAP with 8 in-process
workers, from the paper configs) on a tiny real subset with a narrow model, in two calls, as a
lease that is cut short would: the first trains SB and LB, the second reuses them and trains
SWAP. The table must then hold three finished rows whose numbers come from the runs' own
summaries, and SWAP must have gone through its three phases with 8 workers.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from mpi_util import PYTHON, REPO_ROOT

SCRIPT = str(REPO_ROOT / "benchmarks" / "swap_paper_gpu.py")


def _call(run_root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, SCRIPT, "--smoke", "--run-root", str(run_root), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("SB", "LB", "SWAP", "airbench94"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.timeout(900)
def test_gpu_script_rehearsal_trains_sb_lb_and_swap_across_two_calls(tmp_path):
    first = _call(tmp_path, "--only", "SB", "LB")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = _rows((tmp_path / "table.md").read_text())
    assert rows["SB"][-1] == "done" and rows["LB"][-1] == "done" and rows["SWAP"][-1] == "not asked"

    second = _call(tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    rows = _rows(table)
    assert rows["SB"][-1] == rows["LB"][-1] == "done (earlier call)"  # not trained again
    assert rows["SWAP"][-1] == "done" and rows["airbench94"][-1].startswith("skipped")
    assert "CPU REHEARSAL" in table and "Git commit:" in table and "Command:" in table
    for label in ("SB", "LB", "SWAP"):
        summary = json.loads((tmp_path / label / "summary.json").read_text())
        assert float(rows[label][2]) == pytest.approx(100 * summary["final"]["output/acc"], abs=0.006)
        assert int(rows[label][4]) == summary["steps"] > 0
    swap = json.loads((tmp_path / "SWAP" / "summary.json").read_text())
    assert swap["output_name"] == "swap" and swap["world_size"] == 1
    assert sorted(k for k in swap["final"] if re.fullmatch(r"group\d+/swap/acc", k)) == \
        [f"group{k}/swap/acc" for k in range(8)]  # the 8 workers, each evaluated
    assert all(f"time/phase/{p}" in swap["final"] for p in ("phase1", "phase2", "phase3"))
    assert re.search(r"Phase 1 ended after epoch \d+ at its epoch cap", table)
    # SB and LB ran with batches 64 and 128 on 512 images for 3 epochs: 8 and 4 steps an epoch.
    assert int(rows["SB"][4]) == 24 and int(rows["LB"][4]) == 12
