"""pytest plugin (entry point `pytest11`): a `ppl_regression` fixture that fails a test when a recipe's
perplexity drifts from its stored baseline, with a readable diff; `--sinkquant-update-baselines` rewrites them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sinkquant.errors import SinkquantError
from sinkquant.regression import Outcome, check_baseline


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sinkquant-update-baselines", action="store_true",
                     help="re-measure and rewrite perplexity baseline files instead of comparing")


@pytest.fixture
def ppl_regression(request: pytest.FixtureRequest) -> Callable[[str | Path], Outcome]:
    """Call with a baseline file path: evaluates its recipe and fails the test on drift beyond tolerance."""
    update = request.config.getoption("--sinkquant-update-baselines")

    def check(path: str | Path) -> Outcome:
        try:
            outcome = check_baseline(path, update=update)
        except SinkquantError as exc:
            pytest.fail(str(exc), pytrace=False)
        if not outcome.passed:
            pytest.fail(outcome.message, pytrace=False)
        return outcome

    return check
