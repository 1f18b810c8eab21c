"""`--recipe auto` from the command line: the library's search (sinkquant.search.loop.search_recipe) on the flags
`check_auto_args` has checked, its recipe and trace written into the command's output."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from sinkquant.cli.args import AUTO_CALIB_WINDOWS

if TYPE_CHECKING:
    from sinkquant.data import TokenStream
    from sinkquant.models import LoadedModel


def auto_recipe_file(args: argparse.Namespace, loaded: LoadedModel, stream: TokenStream, folder: Any,
                     shown: Any = None) -> Any:
    """Run the `--recipe auto` search on calibration windows and write the chosen recipe (and its trace) into
    `folder` (the command's own output, never beside it); returns the recipe file, so the result is reproducible
    without searching again. The caller has run `check_auto_args` before loading the model. `shown`: the folder
    the files end up in, when the caller moves them there (an artifact written atomically)."""
    from pathlib import Path

    from sinkquant.search.config import SearchConfig
    from sinkquant.search.loop import search_recipe, write_auto_recipe

    config = SearchConfig(scheme=args.scheme, ctx=args.ctx,
                          calib_windows=getattr(args, "calib_windows", None) or AUTO_CALIB_WINDOWS,
                          budget=args.budget, max_exceptions=args.max_exceptions, target=args.target,
                          progress=not args.quiet)
    recipe, trace = search_recipe(loaded, stream, config)
    path, _ = write_auto_recipe(recipe, trace, Path(folder) / f"auto-{args.scheme}.yaml")
    print(f"sinkquant: --recipe auto chose {[s.name for s in recipe.steps]}; wrote "
          f"{Path(shown) / path.name if shown else path} and its trace", file=sys.stderr)
    return path
