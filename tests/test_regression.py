"""Perplexity regression baselines: the shipped recipes through the pytest plugin, and the failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkquant.errors import SinkquantError
from sinkquant.regression import check_baseline

BASELINES = sorted((Path(__file__).resolve().parent.parent / "eval" / "baselines").glob("*.json"))
# The failure modes below re-evaluate a recipe; the one without calibration is the quickest.
QUICK = next(p for p in BASELINES if p.stem == "w8a8-dynamic-token")


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda p: p.stem)
def test_shipped_recipe_baselines(ppl_regression, baseline: Path) -> None:
    outcome = ppl_regression(baseline)
    assert outcome.passed


def _copy(baseline: Path, tmp_path: Path, **changes) -> Path:
    spec = {**json.loads(baseline.read_text()), **changes}
    path = tmp_path / baseline.name
    path.write_text(json.dumps(spec))
    return path


def test_drift_beyond_tolerance_fails_with_a_readable_diff(tmp_path: Path) -> None:
    source = QUICK
    ppl = json.loads(source.read_text())["ppl"]
    outcome = check_baseline(_copy(source, tmp_path, ppl=ppl / 1.2))
    assert not outcome.passed
    assert "REGRESSION" in outcome.message and "tolerance" in outcome.message


def test_baseline_for_other_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SinkquantError, match="data_sha256 .* not comparable"):
        check_baseline(_copy(QUICK, tmp_path, data_sha256="0" * 64))


def test_update_rewrites_the_baseline(tmp_path: Path) -> None:
    path = _copy(QUICK, tmp_path, ppl=1.0, model_sha256="stale")
    outcome = check_baseline(path, update=True)
    written = json.loads(path.read_text())
    assert written["ppl"] == pytest.approx(outcome.ppl) and written["model_sha256"] != "stale"
    assert check_baseline(path).passed


def test_missing_ppl_needs_a_deliberate_update(tmp_path: Path) -> None:
    spec = json.loads(QUICK.read_text())
    spec.pop("ppl")
    path = tmp_path / "new.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SinkquantError, match="has no ppl yet"):
        check_baseline(path)
