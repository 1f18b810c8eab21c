"""The search's knobs as one typed value, checked when it is made (torch-free, like the checks it uses), so a bad
value is refused before any model work."""

from __future__ import annotations

from dataclasses import dataclass

from sinkquant.search.space import (
    DEFAULT_BUDGET,
    DEFAULT_MAX_EXCEPTIONS,
    SCORE_WINDOWS,
    SEARCH_WINDOWS,
    BaseScheme,
    base_scheme,
    check_budget,
    check_calib_windows,
    check_max_exceptions,
)
from sinkquant.search.targets import TARGETS, Target, check_target


@dataclass(frozen=True)
class SearchConfig:
    """`calib_windows` from the end of the text: the first `score_windows` score every candidate, the rest
    calibrate the chosen recipe, and the last `search_windows` of those calibrate each candidate. `target`: the
    runtime whose refusals bound the candidates (sinkquant.search.targets); simulated is the library's research
    default, the CLI's is native."""

    scheme: str = "w8a8-static"
    ctx: int = 512
    calib_windows: int = 8
    budget: float = DEFAULT_BUDGET
    max_exceptions: int = DEFAULT_MAX_EXCEPTIONS
    score_windows: int = SCORE_WINDOWS
    search_windows: int = SEARCH_WINDOWS
    target: str = "simulated"
    progress: bool = True

    def __post_init__(self) -> None:
        check_target(self.target, self.scheme)
        base_scheme(self.scheme)
        object.__setattr__(self, "budget", check_budget(self.budget))
        check_max_exceptions(self.max_exceptions)
        check_calib_windows(self.calib_windows, self.score_windows, self.search_windows)

    @property
    def base(self) -> BaseScheme:
        return base_scheme(self.scheme)

    @property
    def runtime(self) -> Target:
        return TARGETS[self.target]

    @property
    def final_windows(self) -> int:
        """The chosen recipe's calibration windows: every calibration window but the scoring ones."""
        return self.calib_windows - self.score_windows
