"""The auto-recipe search: `search_recipe(loaded, stream, SearchConfig(...))` returns the chosen recipe and its
trace. Its parts: the objective (objective.py), the typed stages in their order (stages.py, `STAGES`), the state
they share (state.py), the loop (loop.py), the knobs (config.py) and what it searches (space.py, targets.py).
Imported on first use (PEP 562): the CLI checks its flags with space.py and targets.py before torch loads."""

from __future__ import annotations

import importlib
from typing import Any

_API: dict[str, tuple[str, str]] = {
    "SearchConfig": ("sinkquant.search.config", "SearchConfig"),
    "search_recipe": ("sinkquant.search.loop", "search_recipe"),
    "auto_recipe": ("sinkquant.search.loop", "auto_recipe"),
    "write_auto_recipe": ("sinkquant.search.loop", "write_auto_recipe"),
    "STAGES": ("sinkquant.search.stages", "STAGES"),
    "SearchStage": ("sinkquant.search.stages", "SearchStage"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sinkquant.search' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
