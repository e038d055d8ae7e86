"""What a run records: where it came from, and every scalar it produced.

Rank 0 writes, into the run directory:
  run_info.json   resolved config, command line, git commit, library versions, world size
  config.yaml     the resolved config, loadable again with --config
  metrics.jsonl   every logged scalar, one JSON object per line (easy to aggregate)
  tb/             the same scalars and the run's hparams for TensorBoard
  summary.json    final metrics, written at the end
Other ranks log nothing; per-worker values reach rank 0 through the communicator.

TensorBoard runs of different methods line up: every run logs `epoch` against the optimizer
step, and `output/acc` and `output/loss` for the model the method outputs (SB, LB, SWA, SWAP,
HWA, ...), so one chart overlays them. The hparams (the flattened config) are written when the
run starts, with `output/acc` and `output/loss` as their metrics, so a run that is still going
or was stopped shows in the HPARAMS tab too. `./run.sh tensorboard [logdir]` opens them.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from swa_lib.checkpoint import atomic_write_text
from swa_lib.config import Config, flatten, to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
# The scalars every method logs for its output model: the tags to overlay methods on.
OUTPUT_TAGS = ("output/acc", "output/loss")


def git_commit(repo: Path = REPO_ROOT) -> str:
    """HEAD's hash, with '-dirty' if tracked files changed. Outside a checkout (e.g. a
    copy of the tree sent to another machine): $SWA_GIT_COMMIT if set, else 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SWA_GIT_COMMIT", "unknown")


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "horovod", "mpi4py", "tensorboard"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal here
            out[name] = None
    return out


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{socket.gethostname()}: {os.cpu_count()} cores ({cpu}), {gpu}"


class RunLogger:
    """Scalars to TensorBoard and metrics.jsonl on rank 0; a no-op on other ranks."""

    def __init__(self, run_dir: Path, cfg: Config, comm, enabled: bool):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "config": to_dict(cfg),
            "command": [sys.executable, *sys.argv],
            "git_commit": git_commit(),
            "versions": library_versions(),
            "world_size": comm.size,
            "backend": comm.backend,
            "machine": machine_description(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
        }
        atomic_write_text(json.dumps(info, indent=2, default=str), self.run_dir / "run_info.json")
        atomic_write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), self.run_dir / "config.yaml")
        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._epoch_step = None  # the last step `epoch` was logged at (one point per step)
        self._session_end = self._write_hparams()

    def _write_hparams(self):
        """The config as hparams, and the session start, now; returns the session-end summary."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: ("None" if v is None else v) for k, v in flatten(to_dict(self.cfg)).items()}
        experiment, session_start, session_end = hparams(values, dict.fromkeys(OUTPUT_TAGS, 0.0))
        for summary in (experiment, session_start):  # metric values are read from the scalars
            self.writer.file_writer.add_summary(summary)
        return session_end

    def scalars(self, values: dict, step: int, **context) -> None:
        """Log {tag: value} at optimizer step `step`; `context` (epoch, wall_s) goes to jsonl."""
        if not self.enabled:
            return
        if "epoch" in context and step != self._epoch_step:
            self.writer.add_scalar("epoch", context["epoch"], step)
            self._epoch_step = step
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, **context, **values}) + "\n")
        self._jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def finish(self, summary: dict) -> None:
        """Write summary.json and end the hparams session (its metrics are the output/* scalars)."""
        if not self.enabled:
            return
        atomic_write_text(json.dumps(summary, indent=2), self.run_dir / "summary.json")
        self.writer.file_writer.add_summary(self._session_end)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the logs; safe to call twice."""
        if self.writer is not None:
            self.writer.close()
            self._jsonl.close()
            self.writer = None

