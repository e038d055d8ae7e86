"""Checkpoints that survive a kill at any moment, for runs of one or many processes.

Layout of a run's checkpoint directory:

    checkpoints/e0003-swa/rank0.pt, rank1.pt, ...   one file per process
    checkpoints/latest.json                         {"tag": "e0003-swa", "world_size": 4, "config": {...}}

Every process saves its own file, because processes can hold different models (SWAP
phase 2, HWA groups) and always hold different RNG states. Each file is written to a
temporary name, fsynced and renamed. Only after all processes have written (a
barrier) does rank 0 atomically replace `latest.json`. A kill at any point therefore
leaves `latest.json` naming a complete generation, and older generations are deleted
only after the new pointer is in place.

The pointer and every rank's file also hold the run's identity (the resolved config
without the keys that cannot change a result, `swa_lib.config.run_identity`), so a run
can refuse to resume a checkpoint written by another config before it touches anything
(`check_resumable`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to `path` so that a reader sees either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no debris; a kill may
        raise                        # leave a .tmp file, which nothing ever reads
    _fsync_dir(path.parent)


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_pointer(directory: str | Path) -> dict | None:
    """The parsed `latest.json` of a checkpoint directory, or None when there is none (reads only)."""
    pointer = Path(directory) / "latest.json"
    if not pointer.exists():
        return None
    try:
        return json.loads(pointer.read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"checkpoint pointer {pointer} cannot be read ({err}); delete it to start over "
                           f"or write {{\"tag\": ..., \"world_size\": ...}} naming a complete generation") from None


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every flat config key whose value differs (or exists in one only)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: {show(a)} in the checkpoint, {show(b)} now")
    return out


def check_resumable(directory: str | Path, identity: dict, world_size: int) -> list[str]:
    """Why the checkpoint in `directory` cannot be resumed by this run ([] if it can, or if there is none).

    Reads only, so a refused run leaves the directory exactly as it was."""
    info = read_pointer(directory)
    if info is None:
        return []
    where = Path(directory) / info["tag"]
    problems = []
    if info["world_size"] != world_size:
        problems.append(f"checkpoint {where} was written by {info['world_size']} processes, but this run has "
                        f"{world_size}; launch {info['world_size']} processes to resume it, or use another "
                        f"run directory")
    if "config" in info:
        diff = config_differences(info["config"], identity)
        if diff:
            problems.append(f"checkpoint {where} was written by another config; resuming would mix two runs. "
                            f"Differing keys: " + "; ".join(diff) + ". Use the checkpoint's config to resume, "
                            "or another run directory (--run-dir, run.name) for the new config")
    return problems


class CheckpointManager:
    """Saves and finds checkpoint generations of one run; see the module docstring.

    `config`: the run's identity (flat dict), stored in the pointer and in every file."""

    def __init__(self, directory: str | Path, comm, keep: int = 2, config: dict | None = None):
        self.directory = Path(directory)
        self.comm = comm
        self.keep = keep
        self.config = config
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, state: dict, tag: str, pin: bool = False) -> Path:
        """Write this process's `state` under generation `tag`. Collective: all ranks call it.

        A pinned generation (a method's phase boundary) is never pruned."""
        gen = self.directory / tag
        gen.mkdir(parents=True, exist_ok=True)
        if pin and self.comm.rank == 0:
            (gen / "PINNED").touch()
        meta = {} if self.config is None else {"config": self.config}
        path = gen / f"rank{self.comm.rank}.pt"
        try:
            atomic_torch_save({"format_version": FORMAT_VERSION, **meta, **state}, path)
        except (OSError, RuntimeError) as err:  # a full disk (torch raises RuntimeError for a failed write)
            raise OSError(f"checkpoint {path} could not be written ({err}); {self.directory / 'latest.json'} "
                          f"still names the previous complete generation") from err
        self.comm.barrier()  # Distributed: the pointer moves only once every rank's file is on disk
        if self.comm.rank == 0:
            atomic_write_text(json.dumps({"tag": tag, "world_size": self.comm.size, **meta}),
                              self.directory / "latest.json")
            self._prune(keep_tag=tag)
        self.comm.barrier()
        return gen

    def latest_tag(self) -> str | None:
        info = read_pointer(self.directory)
        if info is None:
            return None
        if info["world_size"] != self.comm.size:
            raise RuntimeError(
                f"checkpoint {self.directory / info['tag']} was written by {info['world_size']} processes, "
                f"but this run has {self.comm.size}; resume with the same number of processes "
                f"or start a new run directory (run.resume=false)")
        return info["tag"]

    def load_latest(self, map_location="cpu") -> dict | None:
        """This process's state from the newest complete generation, or None if there is none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path = self.directory / tag / f"rank{self.comm.rank}.pt"
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # any unpickling failure means the same thing
            raise RuntimeError(f"checkpoint {path} cannot be read ({err}); delete it and "
                               f"point {self.directory / 'latest.json'} at an older generation") from None
        if state.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"checkpoint {path} has format {state.get('format_version')}, expected {FORMAT_VERSION}")
        return state

    def _prune(self, keep_tag: str) -> None:
        """Delete all but the newest `keep` complete generations (and pinned ones). A generation without
        every rank's file was left by a failed or killed write: latest.json never named it, so it is
        deleted and not counted among those kept (it could otherwise displace a complete one)."""
        gens = sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name != keep_tag)
        complete = [g for g in gens if all((g / f"rank{r}.pt").exists() for r in range(self.comm.size))]
        unpinned = [g for g in complete if not (g / "PINNED").exists()]
        counted = len(unpinned) + (not (self.directory / keep_tag / "PINNED").exists())  # + the new one
        old = unpinned[: max(0, counted - self.keep)]
        for g in [g for g in gens if g not in complete] + old:
            shutil.rmtree(g, ignore_errors=True)
