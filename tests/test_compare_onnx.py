"""`compare --onnx` and `--onnx-peers`: a recipe row run by ONNX Runtime scores the native backend's perplexity within
the rounding bound, a recipe the exporter refuses is a row with the reason, ONNX Runtime's own quantization is a
peer row, every one of them cached; a bad peer name is refused before torch is imported."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from sinkquant.comparison import compare, write_comparison
from sinkquant.data import plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.perplexity import evaluate
from sinkquant.recipe import load_recipe
from tests.bounds import rounding_bound
from tests.test_hostile_input import refused_before_torch

REPO = Path(__file__).resolve().parent.parent
NAIVE = str(REPO / "recipes" / "w8a8-naive.yaml")


@pytest.mark.slow
@pytest.mark.long
def test_compare_runs_recipes_and_peers_through_onnx_runtime(smollm2, wikitext_stream, tmp_path) -> None:
    data = yaml.safe_load((REPO / "recipes" / "w8a8-prefix-smooth-except-native.yaml").read_text())
    data["steps"][0] = {"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}}  # BOS: no profiling pass
    recipe = tmp_path / "w8a8.yaml"
    recipe.write_text(yaml.safe_dump(data))
    recipes = [str(recipe), str(REPO / "recipes" / "w8a8-dynamic-token.yaml")]
    settings = {"ctx": 128, "max_windows": 2, "calib_windows": 1, "cache_dir": tmp_path / "cache", "progress": False,
                "onnx": True, "onnx_peers": ["dynamic"]}
    first = compare(smollm2, recipes, wikitext_stream, **settings)
    rows = {r["recipe"]: r for r in first["rows"]}
    assert list(rows) == ["fp32", "fp32 (ONNX Runtime)", data["name"], f"{data['name']} (ONNX Runtime)",
                          "w8a8-dynamic-token", "w8a8-dynamic-token (ONNX Runtime)", "ONNX Runtime dynamic"]
    assert abs(rows["fp32 (ONNX Runtime)"]["ppl"] / rows["fp32"]["ppl"] - 1) < 1e-4  # the float graph is exact

    native, exported = rows[data["name"]], rows[f"{data['name']} (ONNX Runtime)"]
    assert exported["runtime"] == "onnxruntime" and exported["prefix"] == native["prefix"]
    # The same recipe applied again (the same model: the row's perplexity), its float-rounding spread sampled in
    # float64.
    quantized = apply_recipe(smollm2, load_recipe(recipe).with_calib_windows(1), wikitext_stream, ctx=128, copy=True)
    plan = plan_windows(wikitext_stream, 128, 2, calib_windows=1)
    assert quantized.evaluate(wikitext_stream, plan, progress=False).ppl == native["ppl"]
    native64 = evaluate(smollm2, wikitext_stream, plan, prefix=quantized.prefix,
                        model=copy.deepcopy(quantized.model).double(), progress=False).ppl
    print(f"compare --onnx: exported {exported['ppl']:.4f} native {native['ppl']:.4f} native f64 {native64:.4f}")
    assert abs(exported["ppl"] / native["ppl"] - 1) < rounding_bound(3e-3, native["ppl"], native64)

    refused = rows["w8a8-dynamic-token (ONNX Runtime)"]
    assert refused["status"] == "refused" and refused["error"].startswith("cannot export to ONNX: ")
    assert "\n" not in refused["error"] and refused["ppl"] is None
    peer = rows["ONNX Runtime dynamic"]
    assert peer["status"] == "ok" and math.isfinite(peer["ppl"]) and peer["weight_bytes"] > 0

    second = compare(smollm2, recipes, wikitext_stream, **settings)
    assert all(r["cached"] for r in second["rows"]), [r["recipe"] for r in second["rows"] if not r["cached"]]
    assert [r["ppl"] for r in second["rows"]] == [r["ppl"] for r in first["rows"]]
    write_comparison(second, tmp_path / "out")
    assert "| w8a8-dynamic-token (ONNX Runtime) | refused: cannot export to ONNX: " in (
        tmp_path / "out" / "compare.md").read_text()
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][-1]["recipe"] == "ONNX Runtime dynamic"


@pytest.mark.parametrize(("peers", "message"), [
    ("minmax,histogram", "--onnx-peers: 'histogram' is not valid; valid: minmax, percentile, entropy, dynamic"),
    ("dynamic,dynamic", "--onnx-peers: 'dynamic' is given twice"),
])
def test_bad_onnx_peers_are_refused_before_torch(peers, message, tmp_path) -> None:
    err = refused_before_torch(["compare", "--recipes", NAIVE, "--onnx-peers", peers, "--out", str(tmp_path / "c")])
    assert message in err
