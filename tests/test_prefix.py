"""Prefix selection on the real SmolLM2 (and the held-out models when installed): BOS only where the model is
trained with one, explicit lists honoured or refused, every candidate checked against the fp calibration loss."""

from __future__ import annotations

import pytest
import torch

from sinkquant.data import plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.models import bos_evidence
from sinkquant.recipe import parse_recipe
from sinkquant.steps.prefix import (
    MAX_NLL_INCREASE,
    calibration_nll,
    check_prefix,
    select_prefix_ids,
    token_id,
    with_bos,
)
from sinkquant.zoo import ZOO

CTX = 128


@pytest.fixture(scope="module")
def calib(wikitext_stream) -> torch.Tensor:
    plan = plan_windows(wikitext_stream, CTX, max_windows=1, calib_windows=2)
    return wikitext_stream.windows(CTX, list(plan.calib_windows))


def test_smollm2_is_trained_with_its_bos_through_the_chat_template(smollm2) -> None:
    evidence = bos_evidence(smollm2)
    assert evidence["bos_id"] == 1 and evidence["trained"]
    assert not evidence["tokenizer_adds_bos"]  # the tokenizer alone would say no
    assert evidence["chat_template_starts_with_bos"]
    assert with_bos(smollm2, [], "auto") == [1]


def test_explicit_bos_under_never_is_refused_not_dropped(smollm2, calib) -> None:
    with pytest.raises(SinkquantError, match="BOS id of smollm2-135m.*bos is 'never'"):
        select_prefix_ids(smollm2, calib, max_tokens=4, bos_mode="never", tokens=[1])
    newline = token_id(smollm2, "\n", "prefix.tokens[0]")
    assert with_bos(smollm2, [newline], "never") == [newline]
    assert with_bos(smollm2, [1, newline], "auto") == [1, newline]  # not duplicated


def test_explicit_list_is_honoured_and_its_check_recorded(smollm2, calib) -> None:
    ids, record = select_prefix_ids(smollm2, calib, max_tokens=4, bos_mode="always", tokens=["\n", 30])
    newline = token_id(smollm2, "\n", "prefix.tokens[0]")
    assert ids == [1, newline, 30] and record["source"] == "recipe"
    rows = record["check"]["candidates"]
    assert [r["id"] for r in rows] == ids and all(r["kept"] for r in rows)
    assert rows[-1]["nll"] == pytest.approx(calibration_nll(smollm2, ids, calib[:2]), rel=1e-5)
    with pytest.raises(SinkquantError, match="max_tokens is 2"):
        select_prefix_ids(smollm2, calib, max_tokens=2, bos_mode="always", tokens=["\n", 30])


def test_an_explicit_list_may_skip_its_check_but_an_automatic_choice_may_not(smollm2, calib) -> None:
    ids, record = select_prefix_ids(smollm2, calib, max_tokens=2, bos_mode="auto", tokens=["\n"], check=False)
    assert ids == [1, token_id(smollm2, "\n", "prefix.tokens[0]")] and "check" not in record
    base = {"name": "p", "description": "d", "scheme": {"weights": {"bits": 8}}}
    assert parse_recipe({**base, "steps": [{"prefix": {"tokens": [1], "check": False}}]})
    with pytest.raises(SinkquantError, match=r"steps\[0\].*check: false needs an explicit tokens list"):
        parse_recipe({**base, "steps": [{"prefix": {"tokens": "profile", "check": False}}]})


def test_check_drops_a_candidate_that_raises_the_fp_loss(smollm2, calib) -> None:
    """A prefix of end-of-turn tokens tells the model a chat just ended: the check must measure that and drop
    every candidate whose prefix costs more than MAX_NLL_INCREASE, while keeping the harmless ones."""
    sample = calib[:2]
    newline = token_id(smollm2, "\n", "prefix.tokens[0]")
    kept, record = check_prefix(smollm2, [], [2, 2, 2, newline], sample, max_tokens=4)
    baseline = record["baseline_nll"]
    for row in record["candidates"]:
        assert row["kept"] == (row["nll"] <= baseline + MAX_NLL_INCREASE)
    assert kept == [r["id"] for r in record["candidates"] if r["kept"]]
    assert calibration_nll(smollm2, kept, sample) <= baseline + MAX_NLL_INCREASE


def test_profile_selection_checks_bos_and_outlier_tokens(smollm2, calib) -> None:
    ids, record = select_prefix_ids(smollm2, calib, max_tokens=4, bos_mode="auto", tokens="profile")
    check = record["check"]
    assert record["source"] == "profile" and record["bos"]["trained"]
    assert check["candidates"][0]["id"] == 1  # BOS is the first candidate
    assert ids == [r["id"] for r in check["candidates"] if r["kept"]]
    assert calibration_nll(smollm2, ids, calib[:2]) <= check["baseline_nll"] + MAX_NLL_INCREASE
    assert "profile" in record  # BOS left room: the profile ranked the content tokens


def test_profile_is_skipped_when_bos_fills_the_prefix(smollm2, calib) -> None:
    """A profile costs as much as the check: with max_tokens 1 and a BOS that passes, nothing it ranks is used."""
    ids, record = select_prefix_ids(smollm2, calib, max_tokens=1, bos_mode="auto", tokens="profile")
    assert ids == [1] and [r["id"] for r in record["check"]["candidates"]] == [1]
    assert "profile" not in record


@pytest.mark.parametrize("name, trained", [("qwen2.5-coder-0.5b", False), ("gemma3-270m", True)])
def test_held_out_models_bos_convention(name: str, trained: bool, wikitext_path) -> None:
    entry = ZOO[name]
    if not entry.installed():
        pytest.skip(f"optional held-out model {name} is not installed: {entry.install}")
    from sinkquant.data import load_text, tokenize
    from sinkquant.models import load_model

    loaded = load_model(name)
    evidence = bos_evidence(loaded)
    assert loaded.bos_id is not None  # both tokenizers name a BOS ...
    assert evidence["trained"] is trained  # ... only Gemma is trained with it
    assert (with_bos(loaded, [], "auto") == [loaded.bos_id]) is trained
    if not trained:  # Qwen's named-but-untrained BOS is the prefix that raised its fp perplexity (issue 14)
        stream = tokenize(load_text(str(wikitext_path)), loaded.tokenizer)
        plan = plan_windows(stream, CTX, max_windows=1, calib_windows=2)
        kept, record = check_prefix(loaded, [], [loaded.bos_id], stream.windows(CTX, list(plan.calib_windows)),
                                    max_tokens=4)
        assert kept == [] and record["candidates"][0]["delta_nll"] > MAX_NLL_INCREASE
