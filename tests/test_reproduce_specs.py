"""Table specs under configs/reproduce: each is well formed before an hour of training is spent on it."""
from __future__ import annotations

import sys

import pytest
import yaml

from mpi_util import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import reproduce, summary, tables  # noqa: E402

SPECS = sorted((REPO_ROOT / "configs" / "reproduce").glob("*.yaml"))


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_table_spec_is_well_formed(spec_path):
    """Before an hour of training: every row's config resolves, every ref names a row, plots import.

    A spec mistake (a misspelt label in a claim, an override the config rejects, a plot function
    that was renamed) would otherwise surface only when the table renders, after all its runs.
    """
    import importlib

    spec = tables.load_spec(spec_path.stem)  # a row from another table (from_table) resolves to that row
    labels = [row["label"] for row in spec["rows"]]
    assert len(labels) == len(set(labels)), f"duplicate row labels in {spec_path.name}"
    dirs = {tables.run_dir_name(row["label"], 0) for row in spec["rows"]}  # two labels, one directory?
    assert len(dirs) == len(labels), f"two row labels of {spec_path.name} share a run directory: {sorted(dirs)}"
    assert spec["output"].endswith(".md")
    if not spec_path.stem.startswith("smoke_"):  # smoke tables write under runs/, never results/
        assert spec["output"].startswith("results/")
    for row in spec["rows"]:
        assert (REPO_ROOT / row.get("entry", spec["entry"])).is_file()
        for seed in row.get("seeds", spec["seeds"]):
            reproduce.Job(spec, spec_path.stem, row, seed)  # load_config raises ConfigError on a bad value
    refs = [ref for pair in spec.get("paired", []) for ref in pair[:2]]
    refs += [ref for claim in spec.get("claims", []) for ref in claim["difference"]]
    averaging = spec.get("averaging", {})  # the averaging table's own references (averaging_report.py)
    refs += [averaging["sweep_row"]] if "sweep_row" in averaging else []
    refs += [averaging["time_to_target"]["row"]] if "time_to_target" in averaging else []
    refs += averaging.get("lr_decay_rows", [])
    for ref in refs:
        assert ref.partition("@")[0] in labels, f"{spec_path.name}: {ref!r} names no row (rows: {labels})"
    for claim in spec.get("claims", []):
        summary.verdict([1.0], claim["expect"])  # raises on an unknown expectation
        # a name with a comma, unquoted in a YAML list ([LB (2 x 1,024), ...]), splits in two
        assert len(claim.get("names", ["a", "b"])) == 2, f"{spec_path.name}: {claim['claim']!r}: names needs 2 entries"
    for entry in spec.get("plots", []):
        module, function = entry.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_swalp_table_spec_loads_its_configs_and_renders_every_cell():
    """configs/reproduce/swalp.yaml: both rows' configs resolve, and every column, paired
    difference and claim reads a key the SWALP strategy writes (fp32 run: SGD and SWA fp32;
    8-bit run: SGD and SWALP 8-bit, each SGD cell its run's model at swa_start)."""
    spec = yaml.safe_load((REPO_ROOT / "configs/reproduce/swalp.yaml").read_text())
    jobs = {row["label"]: reproduce.Job(spec, "swalp", row, 0) for row in spec["rows"]}
    assert jobs["fp32"].config.method.weight_bits is None and jobs["8-bit"].config.method.weight_bits == 8
    for job in jobs.values():
        assert (job.config.method.swa_start_epoch, job.config.schedule.epochs) == (10, 15)
        assert job.config.schedule.lr_update == "epoch" and job.config.data.train_subset is None

    def summary_of(swa, at_start, model):  # the keys Trainer._finish writes for a SWALP run
        return {"final": {"output/acc": swa, "swa/acc": swa, "swa_start_model/acc": at_start, "model/acc": model,
                          "time/train": 100.0, "wall_s": 110.0}, "history": [], "steps": 5850}
    # Hand-made accuracies per seed: fp32 SGD 0.80, SWA 0.82; 8-bit SGD 0.75, SWALP 0.81 (+ seed / 100).
    runs = {}
    for seed in spec["seeds"]:
        runs[("fp32", seed)] = summary_of(0.82 + seed / 100, 0.80 + seed / 100, 0.79)
        runs[("8-bit", seed)] = summary_of(0.81 + seed / 100, 0.75 + seed / 100, 0.74)
    markdown, numbers = tables.render(spec, runs, [], [])
    assert "| fp32 | 83.00 ± 1.00 | 81.00 ± 1.00 | 79.00 ± 0.00 | 100.00 ± 0.00 |" in markdown
    assert "| 8-bit | 82.00 ± 1.00 | 76.00 ± 1.00 | 74.00 ± 0.00 | 100.00 ± 0.00 |" in markdown
    paired = {name: list(v["per_seed"].values()) for name, v in numbers["paired"].items()}
    assert paired["SGD 8-bit − SGD fp32"] == pytest.approx([-5.0] * 3)
    assert paired["SWALP 8-bit − SGD 8-bit"] == pytest.approx([6.0] * 3)
    assert paired["SWALP 8-bit − SGD fp32"] == pytest.approx([1.0] * 3)
    assert [summary.verdict(list(c["per_seed"].values()), c["expect"]) for c in numbers["claims"]] == ["holds"] * 4
