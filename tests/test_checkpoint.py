"""Checkpoints survive a kill at any moment: the pointer always names a complete, readable generation."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from swa_lib.checkpoint import CheckpointManager
from swa_lib.comm import init_comm

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from swa_lib.checkpoint import CheckpointManager
    from swa_lib.comm import init_comm
    manager = CheckpointManager(sys.argv[1], init_comm("single"), keep=2)
    for i in range(10_000):
        # ~16 MB a generation, so a kill often lands in the middle of a write
        manager.save({"i": i, "w": torch.full((4_000_000,), float(i))}, f"e{i:04d}")
        print(i, flush=True)
""")


def test_sigkill_during_writes_leaves_the_latest_generation_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ckpt"), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few generations complete, then kill mid-stream
        assert proc.stdout.readline(), "the writer died before saving"
    time.sleep(0.37)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    state = CheckpointManager(tmp_path / "ckpt", init_comm("single")).load_latest()
    tag = json.loads((tmp_path / "ckpt" / "latest.json").read_text())["tag"]
    assert tag == f"e{state['i']:04d}" and state["i"] >= 2
    assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))


def test_a_failed_write_keeps_the_previous_generation(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, init_comm("single"))
    manager.save({"i": 1}, "e0001")

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        manager.save({"i": 2}, "e0002")
    monkeypatch.undo()
    assert manager.latest_tag() == "e0001"
    assert manager.load_latest()["i"] == 1
    assert not (tmp_path / "e0002" / "rank0.pt").exists()
    assert not list((tmp_path / "e0002").glob(".*tmp*"))  # no debris from the failed write


def test_resume_with_another_world_size_is_refused(tmp_path):
    CheckpointManager(tmp_path, init_comm("single")).save({"i": 1}, "e0001")
    pointer = tmp_path / "latest.json"
    pointer.write_text(json.dumps({"tag": "e0001", "world_size": 4}))
    with pytest.raises(RuntimeError, match="written by 4 processes"):
        CheckpointManager(tmp_path, init_comm("single")).load_latest()


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    manager = CheckpointManager(tmp_path, init_comm("single"))
    manager.save({"i": 1}, "e0001")
    (tmp_path / "e0001" / "rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="rank0.pt cannot be read"):
        manager.load_latest()


def test_old_generations_are_pruned_to_keep(tmp_path):
    manager = CheckpointManager(tmp_path, init_comm("single"), keep=2)
    for i in range(1, 5):
        manager.save({"i": i}, f"e{i:04d}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["e0003", "e0004"]


def test_a_generation_left_incomplete_by_a_failed_write_does_not_count_as_kept(tmp_path):
    """A write that failed on one rank (disk full, a kill) leaves a generation without every rank's file,
    which latest.json never names. Retention must not count it among the `keep` it promises: otherwise
    it deletes a complete generation and keeps the unreadable one, which the error message for a
    corrupt file then offers as the "older generation" to point latest.json at."""
    manager = CheckpointManager(tmp_path, init_comm("single"), keep=2)
    manager.save({"i": 1}, "e0001-phase1")
    manager.save({"i": 2}, "e0002-phase1")
    (tmp_path / "e0002-phase1-b00003").mkdir()  # a preemption checkpoint whose write failed: no rank file
    (tmp_path / "e0002-phase2").mkdir()  # a pinned phase boundary whose write failed
    (tmp_path / "e0002-phase2" / "PINNED").touch()
    manager.save({"i": 3}, "e0003-phase1")  # the rerun, after space was freed, moves on
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["e0002-phase1", "e0003-phase1"]
    for tag in left:
        assert torch.load(tmp_path / tag / "rank0.pt", weights_only=False)["i"] == int(tag[1:5])
