"""Config loading: YAML + dotted overrides into typed objects, and validation that names the problem."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from swa_lib.config import ConfigError, load_config, to_dict
from swa_lib.workload import model_names

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 1}, "method": {"name": "swa", "swa_start_epoch": 3}})
    cfg = load_config(path, ["optim.lr=0.05", "model.kwargs={width: 16}", "schedule.epochs=4"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.model.kwargs == {"width": 16}
    assert cfg.method.name == "swa" and cfg.method.swa_start_epoch == 3
    assert to_dict(cfg)["method"]["name"] == "swa"


def test_int_is_accepted_where_float_is_expected(tmp_path):
    cfg = load_config(write(tmp_path, {"optim": {"lr": 1}}))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_yaml11_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-4\n")  # PyYAML alone would give the string '5e-4'
    assert load_config(path).optim.weight_decay == 5e-4


@pytest.mark.parametrize("override, field, words", [
    ("optim.lr=-1", "optim.lr", "must be > 0"),
    ("optim.batch_size=abc", "optim.batch_size", "expected int"),
    ("model.name=resnet1000", "model.name", "is not one of"),
    ("data.bogus=1", "data.bogus", "unknown key"),
    ("schedule.kind=sawtooth", "schedule.kind", "is not one of"),
    ("optim.momentum=1.5", "optim.momentum", "[0, 1)"),
    ("schedule.warmup_epochs=20", "schedule.warmup_epochs", "below schedule.epochs"),
    ("method.name=nonsense", "method.name", "not a known method"),
    ("method=sgd", "method", "method.name=..."),  # a scalar for a section: named, not a traceback
    ("method=[1]", "method", "expected a mapping"),
    ("method.name=[1]", "method.name", "expected a method's name"),
    ("optim=3", "optim", "expected a mapping"),
    ("dist.backend=carrier_pigeon", "dist.backend", "is not one of"),
])
def test_each_bad_field_is_named(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], model_names=model_names())
    text = str(err.value)
    assert field in text and words in text, text


def test_model_name_is_checked_only_against_the_names_given():
    """The library knows no models: the harness passes its registry (entry points, reproduce)."""
    assert load_config(None, ["model.name=my_own_net"]).model.name == "my_own_net"
    with pytest.raises(ConfigError, match="model.name: 'my_own_net' is not one of a, b"):
        load_config(None, ["model.name=my_own_net"], model_names=["b", "a"])


def test_entry_point_rejects_an_unknown_model_with_exit_2(tmp_path):
    path = write(tmp_path, {"model": {"name": "resnet1000"}})
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "baselines.py"), "--config", str(path),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.name: 'resnet1000' is not one of" in proc.stderr and "resnet9" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=-1", "optim.batch_size=abc", "data.bogus=1"])
    assert len(err.value.problems) == 3


def test_swa_start_beyond_budget_is_rejected():
    with pytest.raises(ConfigError, match="method.swa_start_epoch"):
        load_config(None, ["method.name=swa", "method.swa_start_epoch=11", "schedule.epochs=10"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_entry_point_exits_2_naming_the_field(tmp_path):
    path = write(tmp_path, {"optim": {"lr": -0.1}})
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "baselines.py"), "--config", str(path),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr" in proc.stderr and "-0.1" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_every_shipped_config_is_valid():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    configs = [c for c in configs if "reproduce" not in c.parts]
    assert configs, "no configs found"
    for path in configs:
        load_config(path, model_names=model_names())


@pytest.mark.parametrize("amp, precision", [(True, "bf16"), (False, "fp32")])
def test_run_amp_is_rejected_with_a_pointer_to_run_precision(tmp_path, amp, precision):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"run": {"amp": amp}}))
    text = str(err.value)
    assert "run.amp: replaced by run.precision" in text and f"write run.precision: {precision}" in text, text
    assert "unknown key" not in text  # one clear problem, not two


def test_precision_defaults_to_fp32_and_names_bad_values():
    assert load_config(None).run.precision == "fp32"
    with pytest.raises(ConfigError, match=r"run.precision: 'fp16' is not one of fp32, bf16"):
        load_config(None, ["run.precision=fp16"])
