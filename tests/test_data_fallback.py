"""A clone without the CIFAR-10 JPEG copy: the reduced configs fall back to the official
CIFAR-10 python files under SWA_DATA_ROOT, and say so; with neither, the message says what to do.

The official files here are written by the test in torchvision's pickle format from real
CIFAR-10 images (the JPEG copy's first images of each class); no machine here can download
the originals, so the SWA_DATA_DOWNLOAD=1 path (torchvision's download) is not exercised.
Also where a training run caches decoded images (data.cache_dir, else SWA_DATA_CACHE).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
from test_data import write_fake_cifar

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY = ["data.dataset=cifar10_jpg", "data.train_subset=100", "data.test_subset=50", "model.name=resnet9",
        "model.kwargs={width: 8}", "optim.batch_size=25", "schedule.epochs=1", "eval.batch_size=50",
        "run.progress=false", "run.checkpoint_every_epochs=0"]


def train(tmp_path, data_root: Path, *extra):
    env = {"SWA_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "experiments" / "baselines.py"), "--config", str(ROOT / "configs" /
           "baselines" / "cifar10_resnet9_sgd_smoke.yaml"), "--run-dir", str(tmp_path / "run"),
           *TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_official_files_under_swa_data_root_replace_the_missing_jpeg_copy(tmp_path):
    splits = {s: data.load_dataset("cifar10_jpg", SHARED, s, subset=n) for s, n in (("train", 100), ("test", 50))}
    images = {s: ds.images.numpy() for s, ds in splits.items()}
    labels = {s: ds.labels.numpy() for s, ds in splits.items()}
    root = tmp_path / "official"
    write_fake_cifar(root, "cifar10", images, labels)
    proc = train(tmp_path, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the JPEG copy is not under {root}; using the official CIFAR-10 files instead " \
           f"(found in {root / 'cifar-10-batches-py'})" in proc.stderr, proc.stderr[-3000:]
    assert "done: model test acc" in proc.stdout
    # What was trained on is those files: the run's summary counts their images.
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"train_images": 100' in summary and '"eval_images": 50' in summary, summary
    assert np.array_equal(data.load_dataset("cifar10", root, "test").images.numpy(), images["test"])


def test_neither_copy_stops_with_a_message_naming_both_places_and_the_consent_flag(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    proc = train(tmp_path, empty)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for words in (f"no CIFAR-10 found under the data root {empty}", str(empty / "cifar10" / "cifar10_jpg.tar.xz"),
                  str(empty / "cifar-10-batches-py"), "SWA_DATA_ROOT", "SWA_DATA_DOWNLOAD=1"):
        assert words in proc.stderr, (words, proc.stderr[-3000:])
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_training_config_caches_where_it_says_else_where_SWA_DATA_CACHE_says(tmp_path, monkeypatch):
    """data.cache_dir unset: the decoded arrays go to $SWA_DATA_CACHE (as for load_dataset); set: there."""
    from swa_lib.config import load_config
    from swa_lib.workload import Workload

    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        for split in ("train", "val"):
            folder = tmp_path / "data" / "tiny-imagenet" / split / wnid
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{wnid}_0.JPEG")
    monkeypatch.delenv("SWA_DATA_ROOT", raising=False)
    monkeypatch.setenv("SWA_DATA_CACHE", str(tmp_path / "env_cache"))
    base = ["data.dataset=tiny_imagenet", f"data.root={tmp_path / 'data'}", "data.image_size=32"]
    assert load_config(None, base).data.cache_dir is None
    Workload(load_config(None, base), torch.device("cpu"))
    assert len(list((tmp_path / "env_cache").glob("tiny_imagenet-*.npz"))) == 2  # train and test
    Workload(load_config(None, [*base, f"data.cache_dir={tmp_path / 'config_cache'}"]), torch.device("cpu"))
    assert len(list((tmp_path / "config_cache").glob("tiny_imagenet-*.npz"))) == 2
