"""sinkquant: profile attention sinks and outliers, apply mitigation recipes, evaluate perplexity.

The public API is small; the `sinkquant` command wraps exactly these functions. They are imported on first use
(PEP 562), so `import sinkquant.errors` and `sinkquant --help` do not pay for torch and transformers."""

from __future__ import annotations

import importlib
from typing import Any

from sinkquant.errors import SinkquantError as SinkquantError

# name -> (module, attribute): the whole public API.
_API: dict[str, tuple[str, str]] = {
    "Prefix": ("sinkquant.perplexity", "Prefix"),
    "QuantizedModel": ("sinkquant.engine", "QuantizedModel"),
    "apply_recipe": ("sinkquant.engine", "apply_recipe"),
    "quantize": ("sinkquant.engine", "apply_recipe"),
    "build_prefix": ("sinkquant.perplexity", "build_prefix"),
    "compare": ("sinkquant.comparison", "compare"),
    "evaluate": ("sinkquant.perplexity", "evaluate"),
    "load": ("sinkquant.engine", "load"),
    "save": ("sinkquant.engine", "save"),
    "load_model": ("sinkquant.models", "load_model"),
    "load_recipe": ("sinkquant.recipe", "load_recipe"),
    "parse_recipe": ("sinkquant.recipe", "parse_recipe"),
    "load_text": ("sinkquant.data", "load_text"),
    "plan_windows": ("sinkquant.data", "plan_windows"),
    "tokenize": ("sinkquant.data", "tokenize"),
    "profile": ("sinkquant.profiling.profiler", "profile"),
    "export": ("sinkquant.backends.export", "export"),
    "search_recipe": ("sinkquant.search.loop", "search_recipe"),
    "SearchConfig": ("sinkquant.search.config", "SearchConfig"),
}
__all__ = sorted([*_API, "SinkquantError"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sinkquant' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
