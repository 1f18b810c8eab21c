"""What `--recipe auto` searches and the checks of its arguments, without torch: the command line refuses a bad
--scheme, --budget, --max-exceptions or --calib-windows before any heavy import. docs/auto-search.md says how
each default was chosen."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from sinkquant.errors import SinkquantError
from sinkquant.steps.specs import ClipConfig

# The calibration windows the search needs: SCORE_WINDOWS score every candidate (never calibrated on), at least
# SEARCH_WINDOWS calibrate them.
SCORE_WINDOWS = 1
SEARCH_WINDOWS = 2


@dataclass(frozen=True)
class BaseScheme:
    """A scheme `--recipe auto` starts from, with the search space that suits it."""

    scheme: dict[str, Any]
    max_prefix: int = 4
    alphas: tuple[float, ...] = (0.5, 0.65, 0.8, 0.35)  # walked from the first, one neighbour at a time
    layer_alphas: tuple[float, ...] = (0.3, 0.45, 0.6, 0.75, 0.9)  # coarse: its cost is layers x grid x Linears
    # Clipping's cost is its per-layer grid (layers x grid x rows), not the windows: a coarse grid on few rows.
    # Every field given, so the recipe names them all.
    clip: ClipConfig = ClipConfig(grid=6, min_ratio=0.5, samples=16, seed=0)
    # GPTQ, at int4 only: round-to-nearest int8 weights leave it little to do.
    gptq: bool = False

    def with_gptq(self) -> BaseScheme:
        """The same scheme with GPTQ weights in place of round-to-nearest."""
        return replace(self, scheme={**self.scheme, "weights": {**self.scheme["weights"], "gptq": {}}})


W8A8 = {"weights": {"bits": 8, "granularity": "channel"}, "activations": {"bits": 8, "mode": "static"}}
# The int4 schemes add GPTQ to the same search.
BASE_SCHEMES: dict[str, BaseScheme] = {
    "w8a8-static": BaseScheme(W8A8),
    "w4a8kv8": BaseScheme({"weights": {"bits": 4, "granularity": "group", "group_size": 64},
                           "activations": {"bits": 8, "mode": "static"}, "kv": {"bits": 8, "granularity": "token"}},
                          gptq=True),
    "w4a4kv4": BaseScheme({"weights": {"bits": 4, "granularity": "group", "group_size": 64},
                           "activations": {"bits": 4, "mode": "static"}, "kv": {"bits": 4, "granularity": "token"}},
                          gptq=True),
}
# The mean KL to fp32 (nats per token) that stops releasing exceptions and skips the later stages: a sixth of the
# +3% perplexity goal (ln 1.03), since one scoring window's KL can understate the evaluation windows' loss.
DEFAULT_BUDGET = 0.005
# The most Linear inputs the search releases to full precision while the budget is unmet (never beyond the
# exceptions step's quarter of the layers): a deployment choice, as each runs its GEMM on float activations;
# scoring a count costs no recalibration, so it is not a cost bound.
DEFAULT_MAX_EXCEPTIONS = 32


def base_scheme(name: str) -> BaseScheme:
    if name not in BASE_SCHEMES:
        raise SinkquantError(f"scheme={name!r} is not a base scheme for --recipe auto; valid: "
                             f"{', '.join(BASE_SCHEMES)}")
    return BASE_SCHEMES[name]


def check_max_exceptions(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise SinkquantError(f"max_exceptions={count!r} is not valid; valid: a whole number >= 0, the most Linear "
                             f"inputs the search may keep in full precision (0: none; default "
                             f"{DEFAULT_MAX_EXCEPTIONS}; at most a quarter of the model's quantized layers count)")
    return count


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise SinkquantError(f"budget={budget!r} is not valid; valid: a positive number, the mean KL to fp32 in "
                             f"nats per token: the fewest exception layers that reach it, and no later stage once it "
                             f"is met (default {DEFAULT_BUDGET})")
    return float(budget)


def check_calib_windows(calib_windows: int, score_windows: int = SCORE_WINDOWS,
                        search_windows: int = SEARCH_WINDOWS) -> int:
    if score_windows < 1 or search_windows < 1 or calib_windows - score_windows < search_windows:
        raise SinkquantError(f"calib_windows={calib_windows} must hold score_windows={score_windows} (>= 1) plus at "
                             f"least search_windows={search_windows} (>= 1) calibrating windows: --recipe auto "
                             f"scores each candidate on {score_windows} window(s) and calibrates it on the others; "
                             f"pass --calib-windows {max(score_windows, 1) + max(search_windows, 1)} or more")
    return calib_windows
