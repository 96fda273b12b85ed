"""bench/selector_overhead.py at tiny sizes: one finite row per component and N, files written, the shared default
instances left uncalibrated. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest

from modules.scorers import DEFAULT_SCORERS
from modules.selectors import DEFAULT_SELECTORS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "selector_overhead.py"
TINY = ["--tokens", "16,36", "--repeats", "1", "--width", "32", "--heads", "4", "--ffn", "64", "--layers", "2",
        "--pre-dim", "16", "--text-tokens", "8"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_selector_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tiny_run_has_one_finite_row_per_component_and_size(bench, tmp_path, capsys):
    defaults_before = [repr(c) for c in DEFAULT_SELECTORS + DEFAULT_SCORERS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. an uncalibrated debiased wrapper falling back per image
        result = bench.main(TINY + ["--out", str(tmp_path)])

    rows = result["rows"]
    expected = {(bench.label(c), stage, n) for n in (16, 36)
                for stage, components in ((1, DEFAULT_SELECTORS), (2, DEFAULT_SCORERS)) for c in components}
    assert len(rows) == len(expected) == 2 * (len(DEFAULT_SELECTORS) + len(DEFAULT_SCORERS))
    assert {(r["component"], r["stage"], r["n"]) for r in rows} == expected
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] >= 0, r
        assert math.isfinite(r["share"]) and r["share"] >= 0, r
        assert r["target"] == 0.02 and isinstance(r["over"], bool)  # N <= 1000
        assert r["budget"] == (bench.round_half_up(r["n"] / 9) if r["stage"] == 1 else bench.round_half_up(r["n"] * 0.05))
    assert all(math.isfinite(p["prefill_ms"]) and p["prefill_ms"] > 0 for p in result["prefill"].values())
    calibrated = {r["component"] for r in rows if r["state"].startswith("calibrated")}
    assert {"agilepruner", "debiased(fastervlm)", "debiased(fastv)", "finepruner"} <= calibrated

    table = (tmp_path / "selector_overhead.md").read_text()
    assert table.strip() == capsys.readouterr().out.strip()
    body = table.split("| component |", 1)[1].splitlines()[2:]  # after the header and its rule
    assert len([line for line in body if line.startswith("| ")]) == len(rows)
    assert json.loads((tmp_path / "selector_overhead.json").read_text())["rows"] == json.loads(json.dumps(rows))
    # the benchmark calibrates copies: the shared default instances stay as they were
    assert [repr(c) for c in DEFAULT_SELECTORS + DEFAULT_SCORERS] == defaults_before


def test_targets(bench):
    assert bench.target_share(576) == 0.02
    assert bench.target_share(1296) is None
    assert bench.target_share(2916) == 0.05
