"""Recipe files: every shipped recipe validates; bad ones name the file, the field path and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sinkquant.errors import SinkquantError
from sinkquant.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
W8 = {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert len(recipe.description) > 20
    resolved = recipe.resolved()
    assert "calibration" in resolved and "windows" in resolved["calibration"]
    assert parse_recipe(resolved) == recipe  # the resolved form round-trips


def test_at_least_the_promised_recipes() -> None:
    names = {p.stem for p in RECIPES}
    assert {"w8a8-naive", "w8a8-keep-sink", "w8a8-prefix", "w8a8-prefix-clip", "bnb-int8", "bnb-nf4"} <= names
    assert any(n.startswith("w4a8kv8") for n in names) and any(n.startswith("w4a4kv4") for n in names)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scheme": {"weights": {"granularity": "row"}}},
         "scheme.weights.granularity: Input should be 'tensor', 'channel' or 'group' (got 'row')"),
        ({"scheme": {"weights": {"bits": "eight"}}}, "scheme.weights.bits: Input should be a valid integer"),
        ({"steps": [{"clip": {"grid": 1}}], "scheme": W8},
         "steps[0].clip.grid: Input should be greater than or equal to 2"),
        ({"steps": [{"clip": {"gird": 3}}], "scheme": W8},
         "steps[0].clip.gird: unknown key; valid keys here: grid, min_ratio, samples, seed"),
        ({"steps": [{"clip": {}, "prefix": {}}], "scheme": W8}, "steps[0]: each step is a mapping with one key"),
        ({"steps": [{"cilp": {}}], "scheme": W8}, "steps[0]: unknown step 'cilp'; valid steps: act, clip, exceptions"),
        ({"stepz": [], "scheme": W8}, "stepz: unknown key; valid keys here: name, description, backend"),
        ({"scheme": {"weights": {"granularity": "group"}}}, "granularity 'group' needs group_size"),
        ({"backend": "tensorrt"}, "unknown backend 'tensorrt'; valid: simulated, native, bnb-int8"),
        ({"backend": "bnb-nf4", "steps": [{"clip": {}}]}, "leave steps and scheme out"),
        ({"scheme": {}}, "scheme quantizes nothing"),
        # steps as components: needs, duplicates, order, conflicts, all at parse time
        ({"steps": [{"exceptions": {"top": 2}}], "scheme": {"weights": {"bits": 8},
                                                            "activations": {"mode": "dynamic-token"}}},
         "steps[0] (exceptions): exceptions needs scheme.activations.mode: static"),
        ({"steps": [{"clip": {}}], "scheme": {"weights": {"bits": 8}, "activations": {"mode": "dynamic-token"}}},
         "steps[0] (clip): clip needs scheme.activations.mode: static"),
        ({"steps": [{"smooth": {"alpha": 0.5}}, {"smooth": {"alpha": 0.8}}], "scheme": W8},
         "steps[1] (smooth): duplicate step; smooth may appear once"),
        ({"steps": [{"exceptions": {"top": 2}}, {"smooth": {}}], "scheme": W8},
         "steps[1] (smooth): changes the model before quantization, so it cannot follow steps[0] (exceptions)"),
        ({"steps": [{"exceptions": {}}], "scheme": W8}, "give exactly one of top (a count) or layers"),
        ({"steps": [{"smooth": {"layer_grid": [0.5, 1.5]}}], "scheme": W8},
         "steps[0].smooth.layer_grid.1: Input should be less than or equal to 1"),
        ({"steps": [{"smooth": {"layers": {"model.layers.0.input_layernorm": -0.1}}}], "scheme": W8},
         "steps[0].smooth.layers.model.layers.0.input_layernorm: Input should be greater than or equal to 0"),
        ({"steps": [{"keep_sink": {"positions": [-1]}}], "scheme": W8},
         "steps[0].keep_sink.positions.0: Input should be greater than or equal to 0"),
        ({"steps": [{"keep_sink": {}}], "scheme": {"weights": {"bits": 8}}},
         "keep_sink needs scheme.activations or scheme.kv"),
    ],
)
def test_bad_recipes(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "description": "a bad recipe", **data}))
    with pytest.raises(SinkquantError) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_steps_run_in_the_listed_order_and_resolve_to_what_was_given() -> None:
    recipe = parse_recipe({"name": "order", "description": "keep_sink then smooth then clip",
                           "steps": [{"keep_sink": {}}, {"smooth": {"alpha": 0.3}}, {"clip": {"grid": 4}}],
                           "scheme": W8})
    assert [s.name for s in recipe.steps] == ["keep_sink", "smooth", "clip"]
    resolved = recipe.resolved()
    assert resolved["steps"] == [{"keep_sink": {"positions": [0], "token_ids": []}}, {"smooth": {"alpha": 0.3}},
                                 {"clip": {"grid": 4, "min_ratio": 0.3, "samples": 512, "seed": 0}}]
    assert "gptq" not in resolved["scheme"]["weights"] and "kv" not in resolved["scheme"]


def test_not_yaml_and_missing(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(SinkquantError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(SinkquantError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SinkquantError, match="must be a YAML mapping"):
        load_recipe(listing)
