"""What the CLI says on stderr when it cannot follow a flag as given (the BOS flag under a prefix recipe)."""

from __future__ import annotations

import sys
from typing import Any


def note(command: str, message: str) -> None:
    """A flag the run could not follow as given: said on stderr (and recorded in the result by the caller)."""
    print(f"sinkquant {command}: note: {message}", file=sys.stderr)


def bos_override(command: str, recipe_name: str, prefix_tokens: Any, bos: str) -> dict[str, Any] | None:
    """A prefix recipe puts its own prefix (BOS included where it asks) in front of every window, whatever --bos
    says; say so when --bos asked for something else, and return the record of it."""
    if bos == "never":
        return None
    note(command, f"recipe {recipe_name} puts its prefix {prefix_tokens} in front of every window; "
                  f"--bos {bos} is overridden (the prefix decides whether BOS is there)")
    return {"flag": "--bos", "given": bos, "used": "recipe prefix", "prefix": prefix_tokens, "recipe": recipe_name}
