"""Recipes: YAML files of mitigation steps plus a quantization scheme, applied before int8/int4 quantization."""

from sinkquant.recipes.apply import QuantizedModel, apply_recipe
from sinkquant.recipes.schema import Recipe, load_recipe, parse_recipe

__all__ = ["QuantizedModel", "Recipe", "apply_recipe", "load_recipe", "parse_recipe"]
