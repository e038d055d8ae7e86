"""swa_lib as a library: it installs with pip, imports nothing of the harness, and every
example under examples/ runs against the installed package from outside the checkout.

The fresh venvs get the heavy dependencies (torch, Horovod, mpi4py, torchvision) from the
project's .venv through a .pth line, because there is no network here and torch is a
large wheel; swa_lib itself comes only from the install (no repository path is on sys.path).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from mpi_util import MPIRUN, PYTHON, REPO_ROOT, run_process

ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_jpg.tar.xz"
HARNESS_MODULES = {"swa_lib.workload"}  # the one module that binds the Trainer to data/ and models/

# Imports every swa_lib module but the harness bridge, uses the config path, and reports which
# top-level packages got imported; then checks that the bridge fails with its own message.
IMPORT_WALK = r"""
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import swa_lib
names = sorted(m.name for m in pkgutil.walk_packages(swa_lib.__path__, "swa_lib."))
public = [n for n in names if n not in set(sys.argv[2].split(","))]
for name in public:
    importlib.import_module(name)
from swa_lib.config import load_config
load_config(None, ["method.name=hwa", "model.name=my_own_net"])
harness = sorted(m for m in ("models", "data") if m in sys.modules)
try:
    import swa_lib.workload
    bridge = "imported"
except ImportError as err:
    bridge = str(err)
print(json.dumps({"file": swa_lib.__file__, "modules": public, "harness": harness, "bridge": bridge}))
"""


def run_checked(cmd, cwd, timeout_s=300, env=None) -> subprocess.CompletedProcess:
    """Run `cmd` with exactly `env` (no repo root added), killed on timeout, and assert exit 0."""
    return run_process(cmd, timeout_s, env, cwd)


def outside_env() -> dict:
    """The environment minus anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def import_walk(package_parent: Path, python: str, cwd: Path) -> dict:
    proc = run_checked([python, "-I", "-c", IMPORT_WALK, str(package_parent), ",".join(HARNESS_MODULES)],
                       cwd=cwd, env=outside_env(), timeout_s=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_public_library_imports_neither_models_nor_data(tmp_path):
    """A copied swa_lib, with the repository nowhere on sys.path: every public module imports and
    the config path works; `models`/`data` never get imported; the harness bridge says what it needs."""
    shutil.copytree(REPO_ROOT / "swa_lib", tmp_path / "lib" / "swa_lib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    report = import_walk(tmp_path / "lib", PYTHON, cwd=tmp_path)
    assert report["file"] == str(tmp_path / "lib" / "swa_lib" / "__init__.py")
    assert {"swa_lib.comm", "swa_lib.averaging", "swa_lib.quant", "swa_lib.methods.swap", "swa_lib.methods.hwa",
            "swa_lib.methods.lawa_ema", "swa_lib.methods.swalp", "swa_lib.config"} <= set(report["modules"])
    assert report["harness"] == []
    assert "reproduction harness" in report["bridge"] and "models" in report["bridge"], report["bridge"]


def make_venv(path: Path) -> Path:
    """A fresh venv that sees the project's installed dependencies, but no swa_lib."""
    run_checked([PYTHON, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    deps = site_packages(PYTHON, cwd=path.parent)
    (site_packages(python, cwd=path.parent) / "_project_dependencies.pth").write_text(f"{deps}\n")
    return python


def site_packages(python, cwd: Path) -> Path:
    return Path(run_checked([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            cwd=cwd).stdout.strip())


def pip_install(python: Path, *args) -> None:
    run_checked([PYTHON, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                 "--no-build-isolation", "--no-index", *args], cwd=python.parents[2], env=outside_env())


def write_subset_folders(root: Path, train_per_class: int, test_per_class: int) -> None:
    """The first images of each class from the JPEG archive, as train/ and test/ class folders."""
    wanted = {"train": train_per_class, "test": test_per_class}
    with tarfile.open(ARCHIVE, "r|xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] in wanted \
                    and int(Path(parts[2]).stem) < wanted[parts[0]]:
                target = root.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, outside dir): swa_lib installed with `pip install .` from a copy of the sources."""
    base = tmp_path_factory.mktemp("installed")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "swa_lib", src / "swa_lib", ignore=shutil.ignore_patterns("__pycache__"))
    python = make_venv(base / "venv")
    pip_install(python, str(src))
    outside = base / "outside"
    shutil.copytree(REPO_ROOT / "examples", outside / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return python, outside


def test_pip_install_makes_swa_lib_importable_from_anywhere(installed):
    python, outside = installed
    report = import_walk(outside, str(python), cwd=outside)  # outside/ holds no swa_lib
    site = site_packages(python, cwd=outside)
    assert report["file"] == str(site / "swa_lib" / "__init__.py")
    assert report["harness"] == [] and "reproduction harness" in report["bridge"]
    assert {"swa_lib.methods", "swa_lib.quant"} <= set(report["modules"])  # subpackages are installed
    assert not any((site / name).exists() for name in ("models", "data", "experiments", "tests", "examples"))


def test_editable_install_exposes_swa_lib_but_not_the_harness_packages(tmp_path):
    """`pip install -e .`: swa_lib resolves to the checkout, while `models` and `data` (generic names
    that would shadow a user's own) stay invisible outside it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for name in ("swa_lib", "models", "data"):  # the checkout's layout, so a leak would show
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    python = make_venv(tmp_path / "venv")
    pip_install(python, "-e", str(src))
    probe = ("import importlib.util, json, swa_lib; print(json.dumps([swa_lib.__file__] + "
             "[importlib.util.find_spec(m) is not None for m in ('models', 'data')]))")
    out = run_checked([str(python), "-I", "-c", probe], cwd=tmp_path, env=outside_env()).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [str(src / "swa_lib" / "__init__.py"), False, False]


# ------------------------------------------------------------------ examples, from outside the checkout

TRAIN, TEST = 32, 20  # images per class: 320 training images, 200 test images


@pytest.fixture(scope="module")
def image_folders(installed):
    root = installed[1] / "cifar_subset"
    write_subset_folders(root, TRAIN, TEST)
    return root


def run_example(installed, script: str, data_root: Path, np: int | None, *args) -> str:
    python, outside = installed
    cmd = [str(python), str(outside / "examples" / script), "--data-root", str(data_root),
           "--train-per-class", str(TRAIN), "--test-per-class", str(TEST), *map(str, args)]
    if np is not None:
        cmd = [*MPIRUN, "-np", str(np), "-x", "OMP_NUM_THREADS", *cmd]
    out = run_checked(cmd, cwd=outside, env=outside_env(), timeout_s=600).stdout
    assert "API demo on a small real subset" in out, out
    return out


def accuracies(text: str) -> list[float]:
    values = [float(v) for v in re.findall(r"(?<![\d.])[01]\.\d{3}(?!\d)", text)]
    assert values and all(0 <= v <= 1 for v in values), text
    return values


def test_example_lawa_ema_reads_the_archive(installed):
    # 320 images / batch 32 = 10 steps per epoch, 2 epochs; a snapshot every 4 steps: 5 > window 4.
    out = run_example(installed, "lawa_ema_own_loop.py", ARCHIVE, None, "--epochs", 2, "--window", 4)
    assert re.search(r"20 steps: model test acc [\d.]+, LAWA \(ready=True\)", out), out
    accuracies(out)


def test_example_swalp(installed, image_folders):
    # swa_start = epochs // 2 = 1: the average holds epochs 1 and 2.
    out = run_example(installed, "swalp_own_loop.py", image_folders, None, "--epochs", 2)
    assert "8-bit SGD test acc" in out and "SWALP average of 2 epochs" in out, out
    accuracies(out)


def test_example_swa_under_mpirun(installed, image_folders):
    out = run_example(installed, "swa_own_loop.py", image_folders, 2, "--epochs", 2)
    assert re.search(r"processes 2 \(horovod\): SGD test acc [\d.]+, SWA of 2 snapshots", out), out
    accuracies(out)


def test_example_swap_phases_through_comm_split(installed, image_folders):
    out = run_example(installed, "swap_own_loop.py", image_folders, 4, "--epochs", 1, "--phase2-epochs", 1)
    # 4 processes cut into 2 workers of 2; both workers report, and the average.
    assert re.search(r"processes 4 \(horovod\), 2 workers of 2: test acc worker 0 [\d.]+, worker 1 [\d.]+; "
                     r"SWAP average [\d.]+", out), out
    accuracies(out)


def test_example_hwa_under_mpirun(installed, image_folders):
    # 2 groups of one process: 320 / 32 = 10 steps per epoch x 2 epochs = 20 steps, H = 4: 5 cycles.
    out = run_example(installed, "hwa_own_loop.py", image_folders, 2, "--epochs", 2, "--window-cycles", 3)
    assert re.search(r"processes 2 \(horovod\), 2 groups, 5 cycles of 4 steps: .*mean of the last 3 averages",
                     out), out
    accuracies(out)


def test_readme_snippets_are_the_examples():
    """Each example's marked loop appears verbatim in README.md, inside a python block."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    examples = sorted((REPO_ROOT / "examples").glob("*_own_loop.py"))
    assert {p.name for p in examples} == {"swa_own_loop.py", "swap_own_loop.py", "hwa_own_loop.py",
                                          "lawa_ema_own_loop.py", "swalp_own_loop.py"}
    for path in examples:
        marked = re.search(r"# --8<-- \[start:loop\]\n(.*?)# --8<-- \[end:loop\]", path.read_text(), flags=re.S)
        assert marked, f"{path.name}: no marked loop"
        assert marked.group(1) in blocks, f"README.md has no python block equal to the loop of {path.name}"
