"""Recipes: YAML files of steps plus a quantization scheme (schema.py), and prefix selection helpers."""

from sinkquant.recipes.schema import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]
