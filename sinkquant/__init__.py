"""sinkquant: profile attention sinks and outliers, apply mitigation recipes, evaluate perplexity.

The public API is small; the `sinkquant` command wraps exactly these functions."""

from sinkquant.compare import compare
from sinkquant.data import load_text, plan_windows, tokenize
from sinkquant.engine import QuantizedModel, apply_recipe, load, save
from sinkquant.errors import SinkquantError
from sinkquant.models import load_model
from sinkquant.perplexity import Prefix, build_prefix, evaluate
from sinkquant.profiling import profile
from sinkquant.recipes import load_recipe, parse_recipe

quantize = apply_recipe

__all__ = [
    "Prefix",
    "QuantizedModel",
    "SinkquantError",
    "apply_recipe",
    "build_prefix",
    "compare",
    "evaluate",
    "load",
    "load_model",
    "load_recipe",
    "load_text",
    "parse_recipe",
    "plan_windows",
    "profile",
    "quantize",
    "save",
    "tokenize",
]
