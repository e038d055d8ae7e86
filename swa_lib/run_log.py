"""What a run records: where it came from, and every scalar it produced.

Rank 0 writes, into the run directory:
  run_info.json   resolved config, command line, git commit, library versions, world size,
                  and what the run's bits depend on (CPU and its kernels, threads, torch build);
                  a run directory started again (a resume) keeps the earlier starts' commits,
                  dates and machines under "earlier_starts", oldest first
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
from swa_lib.config import Config, flatten, precision_record, to_dict

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


def run_commits(info: dict) -> list[str]:
    """The commits a run directory's code came from, one per start, oldest first (run_info.json)."""
    return [*(s["git_commit"] for s in info.get("earlier_starts", [])), info["git_commit"]]


def _earlier_starts(run_info: Path) -> list[dict]:
    """The starts recorded in an existing run_info.json (a resumed run), oldest first."""
    try:
        old = json.loads(run_info.read_text())
    except (OSError, ValueError):
        return []
    return [*old.get("earlier_starts", []), {k: old.get(k) for k in ("git_commit", "started", "machine")}]


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "horovod", "mpi4py", "tensorboard"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # a missing optional package is recorded, not fatal here
            out[name] = None
    return out


# Environment variables that change which CPU kernels run, and so the bits of a result.
KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "JSIMD_FORCENONE")


def cpu_identity() -> dict:
    """Vendor, family/model/stepping and vector instruction sets of this CPU, from /proc/cpuinfo.

    A VM may show only "AMD EPYC" as the model name for CPUs of different generations, with
    and without AVX-512; family/model/stepping and the flags tell them apart."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "model name", "stepping", "flags") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor describes them all
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {"vendor": fields.get("vendor_id"), "model_name": fields.get("model name", platform.processor() or None),
            "family_model_stepping": "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping")),
            "vector_isa": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}


def numerics_record() -> dict:
    """What the bits of a CPU run depend on (results/determinism_cpu.md measures each): the CPU
    and the kernels torch picked for it, the thread count, the torch build, the JPEG decoder that
    built the data cache, and any environment variable that overrides a kernel choice."""
    import torch
    from PIL import features

    return {"cpu": cpu_identity(),
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's vector kernels
            "torch_build": f"{torch.__version__} (git {torch.version.git_version[:12]})",
            "onednn_mkl": [line.strip().lstrip("- ") for line in torch.__config__.show().splitlines()
                           if "Math Kernel Library" in line or "MKL-DNN" in line],
            "jpeg_decoder": f"Pillow {features.version('pil')}, libjpeg-turbo {features.version('libjpeg_turbo')}",
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


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
            "precision": precision_record(cfg),
            "machine": machine_description(),
            "numerics": numerics_record(),  # what bitwise reproducibility depends on (README)
            "started": dt.datetime.now().isoformat(timespec="seconds"),
        }
        earlier = _earlier_starts(self.run_dir / "run_info.json")
        if earlier:  # a resumed run: its earlier epochs ran from these commits
            info["earlier_starts"] = earlier
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

