"""The auto recipe search on a tiny random llama (SmolLM2's tokenizer, real WikiText-2 tokens): every kept
step lowers the objective, the result parses as a normal recipe and reproduces its objective when re-applied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sinkquant.errors import SinkquantError
from sinkquant.recipes import apply_recipe
from sinkquant.recipes.schema import parse_recipe
from sinkquant.search import kl_to_fp, score_windows, search_recipe
from tests.tiny import tiny_model

CTX, CALIB, SCORE = 32, 2, 1


@pytest.fixture(scope="module")
def tiny(smollm2):
    return tiny_model("llama", smollm2.tokenizer)


def test_search_keeps_only_steps_that_pay_and_reproduces(tiny, wikitext_stream) -> None:
    recipe, trace = search_recipe(tiny, wikitext_stream, ctx=CTX, calib_windows=CALIB, score_count=SCORE,
                                  progress=False)
    ablation = trace["ablation"]
    assert ablation[0]["step"] == "naive" and [a["step"] for a in ablation[1:]] == ["prefix", "smooth",
                                                                                    "exceptions", "clip"]
    values = [a["kl"] for a in ablation]
    assert all(later <= earlier for earlier, later in zip(values, values[1:], strict=False))
    kept = [a["choice"] for a in ablation[1:] if a["kept"]]
    assert recipe["steps"] == kept
    assert len(trace["tried"]) >= 1 + 3 + 3 + 1 + 1  # naive, prefix lengths, alphas, >= 1 exception set, clip
    windows = score_windows(wikitext_stream, CTX, CALIB, SCORE)
    with torch.no_grad():
        reference = [F.log_softmax(tiny.model(input_ids=w[None]).logits[0].float(), dim=-1) for w in windows]
    again = apply_recipe(tiny, parse_recipe(recipe, "auto"), wikitext_stream, ctx=CTX)
    assert kl_to_fp(tiny, again, windows, reference) == pytest.approx(values[-1], rel=1e-4)


def test_written_recipe_loads_back(tmp_path) -> None:
    from sinkquant.recipes import load_recipe
    from sinkquant.search import write_recipe

    recipe = {"name": "auto", "description": "d", "steps": [{"smooth": {"alpha": 0.3}}],
              "scheme": {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}},
              "calibration": {"windows": 2}}
    trace = {"objective": "kl", "ablation": [{"step": "naive", "kl": 0.5}]}
    paths = write_recipe(recipe, trace, tmp_path / "auto.yaml")
    assert load_recipe(paths[0]).step("smooth").alpha == 0.3
    assert paths[1].name == "auto.trace.json" and "naive" in paths[1].read_text()


def test_score_windows_are_disjoint_from_calibration(wikitext_stream) -> None:
    from sinkquant.recipes.apply import calibration_windows

    recipe = parse_recipe({"name": "x", "description": "x", "calibration": {"windows": CALIB},
                           "scheme": {"weights": {"bits": 8}}}, "x")
    calib = {tuple(w.tolist()) for w in calibration_windows(wikitext_stream, recipe, CTX)}
    scored = {tuple(w.tolist()) for w in score_windows(wikitext_stream, CTX, CALIB, 3)}
    assert len(scored) == 3 and not calib & scored


def test_unknown_scheme_is_refused(tiny, wikitext_stream) -> None:
    with pytest.raises(SinkquantError, match="auto search knows w8a8-static"):
        search_recipe(tiny, wikitext_stream, ctx=CTX, scheme="w3a3", progress=False)
