"""The profile on the real SmolLM2-135M: the known facts (token 0 is a sink, its residual peak is > 1000x the
median in the middle layers, always in the same channel), determinism, and the output-folder rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sinkquant.cli import main
from sinkquant.data import TokenStream
from sinkquant.errors import SinkquantError
from sinkquant.io import OUTPUT_MARKER
from sinkquant.models import LoadedModel
from sinkquant.profiling.profiler import profile

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
MIDDLE_LAYERS = range(12, 27)  # 0-based layer outputs where token 0 carries |h| ~ 24,000 (measured)
PEAK_CHANNEL = 507




@pytest.fixture(scope="module")
def report(smollm2: LoadedModel, wikitext_stream: TokenStream, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("profile") / "smollm2"
    result = profile(smollm2, wikitext_stream, ctx=256, windows=2, bos="never", out=out, progress=False)
    result["_out"] = out
    return result


def test_token0_is_an_attention_and_residual_sink(report: dict) -> None:
    verdict = report["verdict"]
    assert 0 in verdict["sink_positions"]
    assert report["attention"]["sink_rate"]["0.3"] > 40  # measured ~54% of heads put > 0.3 on token 0
    late = [row["mean"] for row in report["attention"]["first_token_late"]]
    assert max(late[12:27]) > 0.5
    assert report["residual"]["appear_layer"] is not None and report["residual"]["appear_layer"] <= 12


def test_token0_peak_is_massive_in_a_stable_channel(report: dict) -> None:
    for layer in MIDDLE_LAYERS:
        row = report["residual"]["layers"][layer]
        top1, top2 = row["top"][:2]
        assert top1["position"] == 0 and top1["channel"] == PEAK_CHANNEL
        assert top1["value"] > 1000 * row["median_abs"] and top1["value"] > 10_000
        # the second peak is the same position and channel in the other window: stable across windows
        assert (top2["position"], top2["channel"]) == (0, PEAK_CHANNEL) and top2["window"] != top1["window"]
        # Bondarenko's kurtosis of the layer output: a Gaussian gives 3; two peaks of ~24,000 dominate it
        assert row["kurtosis"] > 1000 and row["inf_norm"] == top1["value"]
    assert report["verdict"]["peak_channels"][0] == PEAK_CHANNEL


def test_verdict_probe_and_provenance(report: dict, smollm2: LoadedModel) -> None:
    verdict = report["verdict"]
    assert verdict["prefix_ids"][0] == smollm2.bos_id == 1
    assert 1 <= len(verdict["prefix_ids"]) <= 1 + verdict["outlier_token_count"]
    assert verdict["broken_linears"] and verdict["broken_linears"][0]["int8_stretch"] >= 4
    probe = report["probe"]
    assert probe["origin"] in ("position", "position+content")
    assert all(p["sink"] for p in probe["position_test"])  # whatever token stands at 0, it is a sink
    assert probe["bos_test"]["bos_takes_sink"] is True
    down = report["linears"]["model.layers.11.mlp.down_proj"]
    # where the sink is written: one token holds most per-token int4 error (PrefixQuant measured 94.7% on Llama)
    assert down["int8_stretch"] > 10 and down["quant_error_share"]["int4_per_token"]["top1"] > 0.5
    assert report["data"]["calib_windows"] == 2 and report["bos"] == {
        "policy": "never", "added": False, "bos_id": 1, "tokenizer_adds_bos": False}
    assert len(report["data"]["sha256"]) == 64 and report["model"]["sha256"]
    assert "Sun et al." in report["sources"]["massive_activation"]
    files = {p.name for p in report["_out"].iterdir()}
    assert {"report.json", "report.html", "report.md", "plots"} <= files


def _deterministic(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("run", "_out")}


def test_determinism_and_overwrite(smollm2: LoadedModel, wikitext_stream: TokenStream, tmp_path: Path) -> None:
    out = tmp_path / "r"
    kwargs = {"ctx": 96, "windows": 1, "progress": False, "probe": False}
    first = profile(smollm2, wikitext_stream, **kwargs)
    out.mkdir()
    (out / OUTPUT_MARKER).write_text("")  # an older run's folder: --overwrite replaces only sinkquant's own
    (out / "stale.txt").write_text("from an older run")
    with pytest.raises(SinkquantError, match="already exists"):
        profile(smollm2, wikitext_stream, out=out, **kwargs)
    second = profile(smollm2, wikitext_stream, out=out, overwrite=True, **kwargs)
    assert _deterministic(first) == _deterministic(second)
    written = json.loads((out / "report.json").read_text())
    assert _deterministic(written) == _deterministic(first)
    assert first["run"]["started"] and "run" in written
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temp folder left behind


def test_cli_profile_and_errors(wikitext_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    common = ["--data", str(wikitext_path), "--ctx", "64", "--calib-windows", "1", "--quiet", "--no-probe"]
    assert main(["profile", *common, "--out", str(out)]) == 0
    assert "sink positions [0]" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["ctx"] == 64

    assert main(["profile", *common, "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["profile", *common, "--model", "./no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short to profile.")
    assert main(["profile", "--data", str(short), "--ctx", "64", "--quiet", "--out", str(tmp_path / "y")]) == 2
    assert "make 0 windows of --ctx 64; this run needs 4 (--calib-windows)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_profiles_several_named_texts(wikitext_path: Path, tmp_path: Path) -> None:
    """`--data NAME=SPEC` repeats: the report compares heads across the named texts (Guo et al.)."""
    from sinkquant.profiling.domains import numbers_text

    numbers = tmp_path / "numbers.txt"
    numbers.write_text(numbers_text().text)
    out = tmp_path / "domains"
    assert main(["profile", "--data", f"wiki={wikitext_path}", "--data", f"numbers={numbers}", "--ctx", "64",
                 "--calib-windows", "1", "--quiet", "--no-probe", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["domains"]["texts"]) == {"wiki", "numbers"}
    assert main(["profile", "--data", f"a={numbers}", "--data", f"a={numbers}", "--ctx", "64", "--quiet",
                 "--out", str(tmp_path / "dup")]) == 2
