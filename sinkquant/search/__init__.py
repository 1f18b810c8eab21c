"""The auto-recipe search: `loop.search_recipe(loaded, stream, config.SearchConfig(...))` returns the chosen recipe
and its trace (also `sinkquant.search_recipe`). Its parts: the objective (objective.py), the typed stages in their
order (stages.py, `STAGES`), the state they share (state.py), the loop (loop.py), the knobs (config.py) and what it
searches (space.py, targets.py). This package's own import is empty: the CLI checks its flags with space.py and
targets.py before torch loads."""
