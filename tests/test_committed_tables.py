"""Every committed headline table follows from its committed run records: restored on a checkout
with no run directories, the records are the runs the spec asks for (config, process count) and
give the table's per-seed numbers, rows, paired differences and claims, as its .json has them."""
from __future__ import annotations

import json
import sys

import pytest

from mpi_util import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from experiments import reproduce, tables  # noqa: E402


def _str_keys(per_seed: dict) -> dict:
    return {str(k): round(v, 6) for k, v in per_seed.items()}


@pytest.mark.parametrize("name", reproduce.headline_specs())
def test_a_committed_table_follows_from_its_records(name, tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")  # a fresh checkout: no run directories
    spec = tables.load_spec(name)
    summaries = reproduce.finished_runs(spec, name)  # exits naming a missing or mismatched run
    _, numbers = tables.render(spec, summaries, [], [])
    committed = json.loads((REPO_ROOT / spec["output"]).with_suffix(".json").read_text())
    for label, row in committed["rows"].items():
        assert _str_keys(numbers["rows"][label]["per_seed"]) == _str_keys(row["per_seed"]), (name, label)
    for title, pair in committed.get("paired", {}).items():
        assert _str_keys(numbers["paired"][title]["per_seed"]) == _str_keys(pair["per_seed"]), (name, title)
    claims = {c["claim"]: c for c in numbers["claims"]}
    for claim in committed.get("claims", []):
        assert _str_keys(claims[claim["claim"]]["per_seed"]) == _str_keys(claim["per_seed"]), (name, claim["claim"])
