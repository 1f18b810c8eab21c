"""sinkquant: profile attention sinks and outliers, apply mitigation recipes, evaluate perplexity."""

from sinkquant.data import load_text, plan_windows, tokenize
from sinkquant.errors import SinkquantError
from sinkquant.models import load_model
from sinkquant.perplexity import Prefix, build_prefix, evaluate

__all__ = [
    "Prefix",
    "SinkquantError",
    "build_prefix",
    "evaluate",
    "load_model",
    "load_text",
    "plan_windows",
    "tokenize",
]
