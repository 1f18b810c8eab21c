"""`--recipe auto`: the search on tiny random models (runs, writes a recipe that reloads and reproduces, never
worse than naive on its calibration objective), on the real SmolLM2 (beats naive static W8A8 on evaluation
windows), and its one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sinkquant.data import plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.errors import SinkquantError
from sinkquant.recipe import load_recipe, parse_recipe
from sinkquant.search.config import SearchConfig
from sinkquant.search.loop import run_stage, search_recipe, write_auto_recipe
from sinkquant.search.objective import NOISE_Z, Objective, improvement_z
from sinkquant.search.space import BASE_SCHEMES
from sinkquant.search.stages import AlphaWalk, LayerAlpha, exception_ranking, prefix_candidates, smallest_count
from sinkquant.search.state import Search, quantized_layers
from tests.tiny import tiny_folder, tiny_model

CTX = 64
# calib 3 = 1 scoring window + 2 calibrating ones, which the search also calibrates on: the trace's objective
# is then exactly the chosen recipe's.
SEARCH = {"ctx": CTX, "calib_windows": 3, "score_windows": 1, "search_windows": 2, "progress": False}


def auto_recipe(loaded, stream, **config):
    """The search with SearchConfig's fields as keywords (the calls below read shorter this way)."""
    return search_recipe(loaded, stream, SearchConfig(**config))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_search_writes_a_recipe_that_reloads_and_reproduces(smollm2, wikitext_stream, tmp_path, arch) -> None:
    loaded = tiny_model(arch, smollm2.tokenizer)
    before = _state(loaded.model)
    # A budget no random model meets: the exception search scores only its largest count.
    recipe, trace = auto_recipe(loaded, wikitext_stream, budget=1e-12, **SEARCH)
    assert all(torch.equal(v, before[k]) for k, v in _state(loaded.model).items())  # the search used copies
    ablation = {a["step"]: a for a in trace["ablation"]}
    assert [a["step"] for a in trace["ablation"] if a["step"] != "keep_sink"] == [
        "prefix", "rotate", "smooth", "exceptions", "alpha", "layer_alpha", "clip"]
    # smoothing is tried at the grid's first value only where rotation was not kept; the alpha walk starts from
    # there, only where smoothing was kept, and carries the exceptions chosen before it
    smoothing = [c for c in trace["candidates"] if c["stage"] == "smooth"]
    assert bool(smoothing) != ablation["rotate"]["kept"] == (ablation["smooth"].get("reason") == "rotation kept")
    assert all(c["steps"][-1] == {"smooth": {"alpha": 0.5}} for c in smoothing)
    walk = [c for c in trace["candidates"] if c["stage"] == "alpha"]
    assert bool(walk) == ablation["smooth"]["kept"] == ("reason" not in ablation["alpha"])
    assert all(c["steps"][-2 if ablation["exceptions"]["kept"] else -1]["smooth"]["alpha"] != 0.5
                        for c in walk)
    assert all(("exceptions" in c["steps"][-1]) == ablation["exceptions"]["kept"] for c in walk)
    # rotation goes in front of the prefix chosen before it
    rotate = next(c for c in trace["candidates"] if c["stage"] == "rotate")
    assert rotate["steps"][0] == {"rotate": {}}
    steps = recipe.resolved()["steps"]
    assert bool(steps and "rotate" in steps[0]) == ablation["rotate"]["kept"]
    # per-layer alphas: a grid searched by the smooth step; kept, the recipe names them (no search on reload)
    smooth = [s["smooth"] for s in steps if "smooth" in s]
    if "reason" not in ablation["layer_alpha"]:
        layer = next(c for c in trace["candidates"] if c["stage"] == "layer_alpha")
        assert next(s["smooth"] for s in layer["steps"] if "smooth" in s)["layer_grid"]
    assert bool(smooth and "layers" in smooth[0]) == ablation["layer_alpha"]["kept"]
    assert not any("layer_grid" in s for s in smooth)
    # an unmet budget: the largest count allowed is the only one scored
    assert len([c for c in trace["candidates"] if c["stage"] == "exceptions"]) <= 1
    assert ("keep_sink" in ablation) == (not ablation["prefix"]["kept"] and bool(trace["verdict"]["sink_positions"]))
    assert all(a["after"] <= a["before"] and a["kept"] == (a["after"] < a["before"]) for a in ablation.values())
    stages = {c["stage"] for c in trace["candidates"]}
    assert {"naive", "rotate", "exceptions", "clip"} <= stages
    assert all(c["seconds"] >= 0 and math.isfinite(c["objective"]) for c in trace["candidates"])
    assert not trace["budget_met"]
    # the first candidate has nothing to beat; a stage is kept only beyond the objective's noise
    assert trace["candidates"][0]["z"] is None and all(c["z"] is not None for c in trace["candidates"][1:])
    assert not smoothing or (smoothing[0]["z"] > NOISE_Z) == ablation["smooth"]["kept"]

    path, trace_path = write_auto_recipe(recipe, trace, tmp_path / "auto.yaml")
    reread = load_recipe(path)
    assert reread == recipe and reread.resolved() == recipe.resolved()
    assert json.loads(trace_path.read_text())["candidates"] == json.loads(json.dumps(trace["candidates"]))

    first = apply_recipe(loaded, reread, wikitext_stream, CTX, copy=True)
    second = apply_recipe(loaded, recipe, wikitext_stream, CTX, copy=True)
    a, b = _state(first.model), _state(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    objective = Objective(loaded, wikitext_stream.windows(CTX, trace["windows"]["score"]))
    chosen = objective(first.model, first.prefix)["objective"]
    naive_recipe = parse_recipe({"name": "naive", "description": "naive", "scheme": BASE_SCHEMES["w8a8-static"].scheme,
                                 "calibration": {"windows": 2, "ctx": CTX}})
    naive_model = apply_recipe(loaded, naive_recipe, wikitext_stream, CTX, copy=True)
    naive = objective(naive_model.model, naive_model.prefix)["objective"]
    assert chosen == pytest.approx(trace["chosen_objective"], rel=1e-4, abs=1e-9)
    assert naive == pytest.approx(trace["naive_objective"], rel=1e-4, abs=1e-9)
    assert chosen <= naive


def test_alpha_walk_and_group_alphas_start_from_kept_smoothing(smollm2, wikitext_stream) -> None:
    """No tiny model keeps smoothing in the full search (rotation wins, or smoothing loses), so the walk and the
    per-group stage start here from a search whose first candidate, kept with nothing to beat, is smoothing."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    score = list(plan_windows(wikitext_stream, CTX, max_windows=1, calib_windows=3).calib_windows)[:1]
    base = BASE_SCHEMES["w8a8-static"]
    search = Search(loaded, wikitext_stream, base, CTX, 2, Objective(loaded, wikitext_stream.windows(CTX, score)),
                    None, progress=False)
    assert search.calibrated("smooth", [{"smooth": {"alpha": base.alphas[0]}}])
    ablation: list[dict] = []
    run_stage(AlphaWalk(), search, ablation)
    run_stage(LayerAlpha(), search, ablation)
    assert [a["step"] for a in ablation] == ["alpha", "layer_alpha"] and not any("reason" in a for a in ablation)
    walk = [c["steps"][-1]["smooth"]["alpha"] for c in search.candidates if c["stage"] == "alpha"]
    assert walk[0] == min(a for a in base.alphas if a > base.alphas[0])  # upwards first, one grid step
    assert base.alphas[0] not in walk and len(set(walk)) == len(walk)
    group = next(c for c in search.candidates if c["stage"] == "layer_alpha")
    assert group["steps"][-1]["smooth"]["layer_grid"] == list(base.layer_alphas)
    chosen = next(s["smooth"] for s in search.best["steps"] if "smooth" in s)
    assert ("layers" in chosen) == ablation[1]["kept"] and "layer_grid" not in chosen


@pytest.mark.parametrize("scheme", ["w4a8kv8", "w4a4kv4"])
def test_int4_base_schemes_add_gptq(smollm2, wikitext_stream, scheme) -> None:
    loaded = tiny_model("llama", smollm2.tokenizer)
    recipe, trace = auto_recipe(loaded, wikitext_stream, scheme=scheme, budget=1e-12, **SEARCH)
    ablation = {a["step"]: a for a in trace["ablation"]}
    assert [a["step"] for a in trace["ablation"] if a["step"] != "keep_sink"] == [
        "prefix", "rotate", "smooth", "exceptions", "alpha", "layer_alpha", "clip", "gptq"]
    assert bool([c for c in trace["candidates"] if c["stage"] == "alpha"]) == ablation["smooth"]["kept"]
    assert all(a["after"] <= a["before"] and a["kept"] == (a["after"] < a["before"]) for a in ablation.values())
    # GPTQ re-runs everything chosen with GPTQ weights
    gptq = next(c for c in trace["candidates"] if c["stage"] == "gptq")
    assert gptq["scheme"]["weights"]["gptq"] == {} and "gptq" not in BASE_SCHEMES[scheme].scheme["weights"]
    assert (recipe.scheme.weights.gptq is not None) == ablation["gptq"]["kept"]
    assert recipe.scheme.kv is not None and recipe.scheme.activations == parse_recipe(
        {"name": "b", "description": "b", "scheme": BASE_SCHEMES[scheme].scheme}).scheme.activations
    # the calibrating windows are the search's own here, so the recipe reproduces the trace's objective
    quantized = apply_recipe(loaded, recipe, wikitext_stream, CTX, copy=True)
    objective = Objective(loaded, wikitext_stream.windows(CTX, trace["windows"]["score"]))
    assert objective(quantized.model, quantized.prefix)["objective"] == pytest.approx(
        trace["chosen_objective"], rel=1e-4, abs=1e-9)
    assert trace["chosen_objective"] <= trace["naive_objective"]


@pytest.mark.long
def test_auto_recipe_beats_naive_static_on_smollm2(smollm2, wikitext_stream) -> None:
    ctx = 128
    recipe, trace = auto_recipe(smollm2, wikitext_stream, ctx=ctx, calib_windows=3, score_windows=1,
                                search_windows=2, progress=False)
    assert trace["chosen_objective"] < trace["naive_objective"]
    assert any(a["kept"] for a in trace["ablation"])
    plan = plan_windows(wikitext_stream, ctx, max_windows=3, calib_windows=8)
    auto = apply_recipe(smollm2, recipe, wikitext_stream, ctx, copy=True).evaluate(wikitext_stream, plan,
                                                                                 progress=False)
    naive = apply_recipe(smollm2, load_recipe("recipes/w8a8-naive.yaml"), wikitext_stream, ctx, copy=True
                         ).evaluate(wikitext_stream, plan, progress=False)
    assert auto.ppl < naive.ppl


def test_improvement_z_separates_a_steady_gain_from_noise() -> None:
    """Paired on the same tokens: a small gain on every token is far beyond the noise, a larger mean gain carried
    by noise is not, and the sign follows the direction."""
    g = torch.Generator().manual_seed(0)
    best = torch.rand(511, generator=g, dtype=torch.float64) * 0.2
    noise = torch.randn(511, generator=g, dtype=torch.float64) * 0.05
    assert improvement_z(best - 0.002, best) > 1e6  # the same gain on every token
    assert improvement_z(best - 0.002 + noise, best) < NOISE_Z < improvement_z(best - 0.02 + noise, best)
    assert improvement_z(best + 0.02 + noise, best) < -NOISE_Z
    assert improvement_z(best, best) == 0.0
    assert math.isfinite(improvement_z(best[:3] - 0.1, best[:3]))  # too few tokens for 32-token runs


@pytest.mark.parametrize("cap", [0, 2])
def test_max_exceptions_caps_the_released_inputs(smollm2, wikitext_stream, cap) -> None:
    """An unmet budget releases the largest count allowed: `max_exceptions` when it is below the quarter of the
    layers, and none at all at 0."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    recipe, trace = auto_recipe(loaded, wikitext_stream, budget=1e-12, max_exceptions=cap, **SEARCH)
    scored = [c["count"] for c in trace["candidates"] if c["stage"] == "exceptions"]
    assert scored == ([cap] if cap else []) and trace["max_exceptions"] == cap
    released = [s["exceptions"]["layers"] for s in recipe.resolved()["steps"] if "exceptions" in s]
    assert len(released[0] if released else []) <= cap
    assert bool(released) == next(a["kept"] for a in trace["ablation"] if a["step"] == "exceptions")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scheme": "w8a8"}, r"scheme='w8a8' is not a base scheme .*valid: w8a8-static"),
    ({"budget": 0}, r"budget=0 is not valid; valid: a positive number"),
    ({"budget": -0.1}, r"budget=-0.1 is not valid"),
    ({"budget": float("nan")}, r"budget=nan is not valid"),
    ({"budget": "small"}, r"budget='small' is not valid"),
    ({"max_exceptions": -1}, r"max_exceptions=-1 is not valid; valid: a whole number >= 0"),
    ({"max_exceptions": 2.5}, r"max_exceptions=2.5 is not valid"),
    ({"calib_windows": 2, "score_windows": 1, "search_windows": 2}, r"calib_windows=2 must hold"),
])
def test_bad_scheme_budget_and_windows_are_one_line_errors(smollm2, wikitext_stream, kwargs, match) -> None:
    loaded = tiny_model("llama", smollm2.tokenizer)
    with pytest.raises(SinkquantError, match=match) as info:
        auto_recipe(loaded, wikitext_stream, **{**SEARCH, **kwargs})
    assert "\n" not in str(info.value)


def test_write_auto_recipe_refuses_a_path_that_is_not_yaml(smollm2, wikitext_stream, tmp_path) -> None:
    recipe = parse_recipe({"name": "n", "description": "d", "scheme": BASE_SCHEMES["w8a8-static"].scheme})
    with pytest.raises(SinkquantError, match=r"must end in \.yaml or \.yml"):
        write_auto_recipe(recipe, {}, tmp_path / "auto.json")
    assert not list(tmp_path.iterdir())


def test_prefix_candidates_are_the_prefix_steps_even_where_the_verdict_names_none(smollm2) -> None:
    """Qwen2.5's verdict names no prefix (no trained BOS, no outlier token counted): the search once tried no
    prefix at all there, while the prefix step itself falls back to PrefixQuant's most frequent outliers."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    report = {"verdict": {"prefix_ids": [], "prefix_candidates": [], "outlier_token_count": 0}}
    candidates = prefix_candidates(loaded, report, torch.empty(0, 0, dtype=torch.long), max_prefix=4)
    newline = smollm2.tokenizer.encode("\n", add_special_tokens=False)
    assert candidates and candidates[-1][-1:] == newline
    assert all(longer[: len(shorter)] == shorter for shorter, longer in zip(candidates, candidates[1:], strict=False))


def test_exceptions_are_ranked_by_measured_output_error_not_range_width(smollm2, wikitext_stream) -> None:
    """A layer whose static scale is far too small (nearly every input clips) has a narrow range, so the
    exceptions step's width order puts it last; the search's error order must put it, with a layer whose range
    is 1000x too wide (nearly every input rounds to zero), above every untouched layer."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    recipe = parse_recipe({"name": "n", "description": "d", "scheme": BASE_SCHEMES["w8a8-static"].scheme,
                           "calibration": {"windows": 2}})
    quantized = apply_recipe(loaded, recipe, wikitext_stream, CTX, copy=True)
    layers = quantized_layers(quantized)
    clipped, widened = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"
    layers[clipped].act_scale = layers[clipped].act_scale * 1e-3
    layers[widened].act_scale = layers[widened].act_scale * 1e3
    windows = wikitext_stream.windows(CTX, [0, 1])
    ranking = exception_ranking(quantized, layers, windows, [])
    assert set(ranking[:2]) == {clipped, widened}
    assert sorted(ranking) == sorted(n for n, m in layers.items() if m.activations is not None)


@pytest.mark.parametrize("limit", [1, 2, 5, 16])
def test_exception_count_is_the_smallest_that_meets_in_logarithmic_steps(limit) -> None:
    for smallest in range(1, limit + 1):
        asked: list[int] = []

        def meets(k: int, smallest: int = smallest, asked: list[int] = asked) -> bool:
            asked.append(k)
            return k >= smallest

        assert smallest_count(limit, meets) == smallest
        assert len(asked) <= 2 * math.ceil(math.log2(limit)) + 1


def test_target_restricts_the_search_and_names_its_backend(smollm2, wikitext_stream) -> None:
    """--target compressed-tensors on a Gemma 3 model: its rotation (online after the post-norms) has no
    compressed-tensors form, so the rotation candidate is logged as refused and never quantized (no objective,
    no seconds); everything else is tried, and the chosen recipe runs on the native backend."""
    loaded = tiny_model("gemma3", smollm2.tokenizer)
    recipe, trace = auto_recipe(loaded, wikitext_stream, budget=1e-12, target="compressed-tensors", **SEARCH)
    rotate = [c for c in trace["candidates"] if c["stage"] == "rotate"]
    assert len(rotate) == 1 and "objective" not in rotate[0] and "seconds" not in rotate[0]
    assert rotate[0]["refused"] == ["step 'rotate': online rotation after the post-norms (Gemma): a runtime "
                                    "applies online transforms at a Linear's input or output only, and these sit "
                                    "between the norm and the residual add"]
    assert all("objective" in c for c in trace["candidates"] if c["stage"] not in ("rotate", "keep_sink"))
    assert all("refused" in c for c in trace["candidates"] if c["stage"] == "keep_sink")
    assert trace["target"] == "compressed-tensors" and recipe.backend == "native"
    assert not any(step.name in ("rotate", "keep_sink") for step in recipe.steps)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target": "tflite"}, r"--target 'tflite' is not valid; valid: native, compressed-tensors, onnx, simulated"),
    ({"target": "native", "scheme": "w4a8kv8"}, r"--scheme w4a8kv8 cannot run on --target native \(scheme\.weights"),
    ({"target": "compressed-tensors", "scheme": "w4a4kv4"}, r"cannot run on --target compressed-tensors \(W4A4"),
])
def test_a_target_that_cannot_run_the_scheme_is_a_one_line_error(smollm2, wikitext_stream, kwargs, match) -> None:
    with pytest.raises(SinkquantError, match=match) as info:
        auto_recipe(tiny_model("llama", smollm2.tokenizer), wikitext_stream, **{**SEARCH, **kwargs})
    assert "\n" not in str(info.value)


@pytest.mark.long
@pytest.mark.parametrize("target", ["native", "compressed-tensors"])
def test_quantize_auto_writes_the_targets_artifact(smollm2, wikitext_path, tmp_path, target) -> None:
    """`quantize --recipe auto` (default target native) writes a native artifact, not a simulated one;
    `--target compressed-tensors` writes a compressed-tensors folder that `sinkquant eval` runs."""
    from sinkquant.backends.native import NativeLinear
    from sinkquant.cli import main
    from sinkquant.engine import load

    model_dir = tiny_folder("llama", smollm2.tokenizer, tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(wikitext_path.read_text()[:40000])
    common = ["--quiet", "--model", str(model_dir), "--data", str(text), "--ctx", "64", "--max-windows", "2",
              "--bos", "never"]
    flags = [] if target == "native" else ["--target", target]
    assert main(["quantize", "--recipe", "auto", *flags, *common, "--calib-windows", "3", "--out",
                 str(tmp_path / "out")]) == 0
    if target == "native":
        artifact = load(tmp_path / "out")
        assert artifact.recipe.backend == "native"
        assert any(isinstance(m, NativeLinear) for m in artifact.model.modules())
    else:
        manifest = json.loads((tmp_path / "out" / "sinkquant_export.json").read_text())
        assert manifest["format"] == "compressed-tensors" and manifest["recipe"]["backend"] == "native"
        assert main(["eval", *common, "--model", str(tmp_path / "out")]) == 0
