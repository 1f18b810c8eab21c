"""Shared fixtures: the real embedded SmolLM2 and the real WikiText-2 test file from ../shared."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sinkquant.cli.noise import drop_known_noise

drop_known_noise()  # before the imports below pull in torchao (xdist workers print what pytest does not capture)

from sinkquant.data import TokenStream, WindowPlan, load_text, plan_windows, tokenize  # noqa: E402
from sinkquant.models import LoadedModel, load_model  # noqa: E402
from sinkquant.perplexity import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WIKITEXT2 = Path(os.environ.setdefault("SINKQUANT_WIKITEXT2",
                                       str(REPO.parent / "shared/data/wikitext-2-raw/wiki.test.raw")))
if "PYTEST_XDIST_WORKER" in os.environ:
    # One worker per core (`pytest -n 2`): a second torch thread per worker would only contend. The suite's
    # numbers do not depend on it (a regression baseline measures bit-identically with 1 and 2 threads).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first (`long` marker): a two-minute test collected last would keep one pytest-xdist worker busy
    while the others idle."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Profiling hooks run hundreds of small tensor ops per window; on a shared 2-core machine each one waits for
    a busy second thread, so one thread is several times faster there (and leaves the other core to others)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT2.is_file():
        pytest.fail(f"WikiText-2 test file not found at {WIKITEXT2}; set SINKQUANT_WIKITEXT2")
    return WIKITEXT2


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real model, loaded once per session; tests that modify it must work on a copy."""
    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wikitext_stream(smollm2: LoadedModel, wikitext_path: Path) -> TokenStream:
    return tokenize(load_text(str(wikitext_path)), smollm2.tokenizer)


@pytest.fixture(scope="session")
def eval_and_calib(smollm2: LoadedModel, wikitext_stream: TokenStream):
    """(ctx, eval windows, calib windows) -> (plan, calibration batches, fp32 perplexity), computed once each."""

    @functools.cache
    def make(ctx: int, windows: int, calib_windows: int) -> tuple[WindowPlan, list[torch.Tensor], float]:
        plan = plan_windows(wikitext_stream, ctx=ctx, max_windows=windows, calib_windows=calib_windows)
        calib = [wikitext_stream.windows(ctx, [i]) for i in plan.calib_windows]
        return plan, calib, evaluate(smollm2, wikitext_stream, plan, bos="never", progress=False).ppl

    return make
