"""One code style, enforced: `ruff check .` with the rules of pyproject.toml passes on the whole checkout.

CI (`.ci/run` -> `./run.sh test`) runs it as part of the suite; `./run.sh lint` runs the same
check alone, and `./run.sh lint --fix` applies ruff's safe fixes.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mpi_util import REPO_ROOT


def test_ruff_check_passes_on_the_checkout():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: it is pinned in requirements.txt (./run.sh setup installs it)"
    out = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check found problems (./run.sh lint --fix fixes some):\n{out.stdout[-5000:]}"
    assert "All checks passed" in out.stdout
