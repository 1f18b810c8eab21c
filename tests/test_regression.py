"""Perplexity regression baselines: the shipped recipes through the pytest plugin, the typed baseline schema,
the kernel-path noise floor, the ratio metric, updating, and the CLI's report over several files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sinkquant.cli import main
from sinkquant.errors import SinkquantError
from sinkquant.regression import (
    K_SPREAD,
    Baseline,
    check_baseline,
    cpu_kernel,
    lower_kernel_paths,
    measure,
    read_baseline,
)

BASELINES = sorted((Path(__file__).resolve().parent.parent / "eval" / "baselines").glob("*.json"))
# The failure modes below re-evaluate a recipe; the one without calibration is the quickest, at a small size.
QUICK = next(p for p in BASELINES if p.stem == "w8a8-dynamic-token")
SMALL = {"ctx": 64, "windows": 1}


@pytest.mark.long
@pytest.mark.parametrize("baseline", BASELINES, ids=lambda p: p.stem)
def test_shipped_recipe_baselines(ppl_regression, baseline: Path) -> None:
    outcome = ppl_regression(baseline)
    assert outcome.passed
    # Every shipped baseline was measured on each kernel path this machine kind has, this one included.
    assert outcome.baseline_kernel == cpu_kernel()


def _copy(baseline: Path, tmp_path: Path, **changes) -> Path:
    """The baseline in tmp_path with its recipe path re-anchored (it resolves against the baseline's folder)."""
    spec = {**json.loads(baseline.read_text()), **changes}
    if "recipe" not in changes:
        spec["recipe"] = str((baseline.parent / spec["recipe"]).resolve())
    path = tmp_path / baseline.name
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ctx": "128"}, "ctx: Input should be a valid integer (got '128')"),
        ({"rel_tol": "0.01"}, "rel_tol: Input should be a valid number (got '0.01')"),
        ({"ppl": 0}, "ppl: Input should be greater than 0"),
        ({"rel_tol": 1e9}, "rel_tol: Input should be less than or equal to 0.5"),
        ({"rel_tol": -0.5}, "rel_tol: Input should be greater than 0"),
        ({"windows": 0}, "windows: Input should be greater than or equal to 1"),
        ({"ctx": 1}, "ctx: Input should be greater than or equal to 2"),
        ({"metric": "nll"}, "metric: Input should be 'ppl' or 'ratio'"),
        ({"tolerance": 0.1}, "tolerance: unknown key; valid keys: recipe, model"),
        ({"kernels": {"AVX2": {"ppl": -1.0, "fp32_ppl": 30.0}}}, "kernels.AVX2.ppl: Input should be greater than 0"),
    ],
)
def test_bad_baseline_is_one_line_naming_file_and_field(tmp_path: Path, change: dict, field: str) -> None:
    path = _copy(QUICK, tmp_path, **change)
    with pytest.raises(SinkquantError) as info:
        read_baseline(path)
    message = str(info.value)
    assert message.startswith(f"baseline file {path}: ") and field in message and "\n" not in message


def test_baseline_that_is_not_an_object_or_too_big(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(SinkquantError, match="must hold a JSON object with keys recipe, model, data, ctx"):
        read_baseline(listed)
    big = tmp_path / "big.json"
    big.write_text(" " * (1 << 20) + "{}")
    with pytest.raises(SinkquantError, match="baselines are at most 1048576 bytes"):
        read_baseline(big)


def test_recipe_resolves_against_the_baseline_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped relative path must not depend on the working directory
    spec = read_baseline(QUICK)
    assert spec.recipe.startswith("../../recipes/")
    moved = _copy(QUICK, tmp_path, recipe=spec.recipe)
    with pytest.raises(SinkquantError, match=r"resolves to .*recipes/w8a8-dynamic-token.yaml, which is not a file"):
        check_baseline(moved)


def test_tolerance_is_the_larger_of_rel_tol_and_k_times_the_kernel_spread() -> None:
    spec = Baseline(recipe="r.yaml", model="m", data="d", ctx=128, windows=2, rel_tol=0.01,
                    kernels={"AVX2": {"ppl": 100.0, "fp32_ppl": 40.0}, "AVX512": {"ppl": 104.0, "fp32_ppl": 40.0}})
    assert spec.spread() == pytest.approx(4 / 102)
    assert spec.tolerance() == pytest.approx(K_SPREAD * 4 / 102)
    assert spec.reference("AVX2") == (100.0, "AVX2")  # the same kernel path's own value
    assert spec.reference("SVE256") == (102.0, "mean of AVX2+AVX512")  # an unseen path: the centre
    quiet = spec.model_copy(update={"rel_tol": 0.2})
    assert quiet.tolerance() == 0.2
    ratio = spec.model_copy(update={"metric": "ratio"})
    assert ratio.reference("AVX512") == (pytest.approx(2.6), "AVX512")


def test_kernel_paths_below_the_default() -> None:
    assert lower_kernel_paths("AVX512") == ("AVX2",)
    assert lower_kernel_paths("AVX2") == ()
    assert lower_kernel_paths("SVE256") == ()


def test_drift_beyond_tolerance_fails_with_a_readable_diff(tmp_path: Path) -> None:
    run = measure(_copy(QUICK, tmp_path, **SMALL), fp32=False)
    kernel = cpu_kernel()
    other = "AVX2" if kernel != "AVX2" else "AVX512"
    stored = {kernel: {"ppl": run.ppl / 1.2, "fp32_ppl": 30.0}, other: {"ppl": run.ppl / 1.21, "fp32_ppl": 30.0}}
    outcome = check_baseline(_copy(QUICK, tmp_path, **SMALL, rel_tol=0.01, kernels=stored))
    assert not outcome.passed and outcome.baseline_kernel == kernel
    message = outcome.message
    assert "REGRESSION" in message and f"{run.ppl:.4f} on {kernel}" in message
    assert f"baseline {run.ppl / 1.2:.4f} from {kernel}" in message
    a, b = run.ppl / 1.2, run.ppl / 1.21
    noise = 100 * K_SPREAD * (a - b) / ((a + b) / 2)
    assert "rel_tol 1.00%" in message and f"{K_SPREAD:g} x kernel spread = {noise:.2f}%" in message


def test_ratio_metric_compares_quantized_over_fp32_of_the_same_run(tmp_path: Path) -> None:
    """A library upgrade that moves fp32 and the recipe together passes a ratio baseline, fails an absolute one."""
    run = measure(_copy(QUICK, tmp_path, **SMALL), fp32=True)
    moved = {cpu_kernel(): {"ppl": run.ppl * 1.1, "fp32_ppl": run.fp32_ppl * 1.1}}  # as if fp32 moved by 10%
    assert check_baseline(_copy(QUICK, tmp_path, **SMALL, metric="ratio", kernels=moved)).passed
    absolute = check_baseline(_copy(QUICK, tmp_path, **SMALL, metric="ppl", kernels=moved))
    assert not absolute.passed and "IMPROVED beyond tolerance" in absolute.message


def test_baseline_for_other_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SinkquantError, match="data_sha256 .* not comparable"):
        check_baseline(_copy(QUICK, tmp_path, data_sha256="0" * 64, ppl=50.0))


@pytest.mark.long
def test_update_measures_every_kernel_path(tmp_path: Path) -> None:
    path = _copy(QUICK, tmp_path, **SMALL, kernels={}, ppl=1.0, model_sha256="stale")
    outcome = check_baseline(path, update=True)
    written = read_baseline(path)
    # torch's default path (the highest) and each x86 path below it; this process's path among them
    assert any(set(written.kernels) == {k, *lower_kernel_paths(k)} for k in written.kernels)
    assert cpu_kernel() in written.kernels
    assert written.model_sha256 != "stale" and written.ppl == pytest.approx(
        sum(k.ppl for k in written.kernels.values()) / len(written.kernels))
    assert outcome.baseline is None and "baseline written" in outcome.message
    assert check_baseline(path).passed


def test_missing_measurement_needs_a_deliberate_update(tmp_path: Path) -> None:
    spec = json.loads(_copy(QUICK, tmp_path).read_text())
    spec.pop("ppl", None)
    spec.pop("kernels", None)
    path = tmp_path / "new.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SinkquantError, match="no measured ppl yet; re-measure it deliberately"):
        check_baseline(path)


def test_check_reports_every_file_then_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _copy(QUICK, tmp_path, rel_tol=-0.5)
    second = tmp_path / "missing.json"
    code = main(["check", "--quiet", str(first), str(second)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{first}: error: baseline file {first}: rel_tol" in err
    assert f"{second}: error: baseline file {second} does not exist" in err
    assert err.strip().splitlines()[-1] == f"sinkquant check: error: 2 of 2 baseline(s) failed: {first}, {second}"


def test_a_bad_baseline_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """`sinkquant check` validates every baseline (and its recipe) before the heavy imports, like the other
    commands' refusals that need no model."""
    bad = _copy(QUICK, tmp_path, kernels={"BOGUS": {"ppl": 0.001}})
    probe = ("import sys; from sinkquant.cli import main; code = main(['check', '--quiet', sys.argv[1]]); "
             "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, check=False)
    assert result.stdout.split() == ["2", "False"]
    assert f"{bad}: error: baseline file {bad}: kernels" in result.stderr and "Traceback" not in result.stderr
