"""sinkquant: profile attention sinks and outliers, apply mitigation recipes, evaluate perplexity.

The public API is small; the `sinkquant` command wraps exactly these functions."""

from sinkquant.compare import compare
from sinkquant.data import load_text, plan_windows, tokenize
from sinkquant.errors import SinkquantError
from sinkquant.models import load_model
from sinkquant.perplexity import Prefix, build_prefix, evaluate
from sinkquant.profiling import profile
from sinkquant.recipes import apply_recipe, load_recipe
from sinkquant.recipes.artifact import load, save

__all__ = [
    "Prefix",
    "SinkquantError",
    "apply_recipe",
    "build_prefix",
    "compare",
    "evaluate",
    "load",
    "load_model",
    "load_recipe",
    "load_text",
    "plan_windows",
    "profile",
    "save",
    "tokenize",
]
