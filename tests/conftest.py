"""Shared fixtures: the real embedded SmolLM2 and the real WikiText-2 test file from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sinkquant.data import TokenStream, load_text, tokenize
from sinkquant.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parent.parent
WIKITEXT2 = Path(os.environ.setdefault("SINKQUANT_WIKITEXT2",
                                       str(REPO.parent / "shared/data/wikitext-2-raw/wiki.test.raw")))


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
