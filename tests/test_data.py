"""Text loading through the real `datasets` loaders, and disjoint window plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkquant.data import TokenStream, load_text, plan_windows
from sinkquant.errors import SinkquantError

WIKITEXT2_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def test_local_wikitext_is_byte_exact(wikitext_path: Path) -> None:
    text = load_text(str(wikitext_path))
    assert text.sha256 == WIKITEXT2_SHA256
    assert len(text.text.encode("utf-8")) == 1_290_590
    assert text.source["builder"] == "text"


def test_default_name_uses_local_copy(wikitext_path: Path) -> None:
    text = load_text("wikitext2", local_copy=str(wikitext_path))
    assert text.sha256 == WIKITEXT2_SHA256
    assert "local copy" in text.source["dataset"]


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"text": "first row"}, {"text": "second row"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_text(str(jsonl)).text == "first row\n\nsecond row"
    import datasets

    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert load_text(str(parquet)).text == "first row\n\nsecond row"
    with pytest.raises(SinkquantError, match="no field 'body'; fields: text"):
        load_text(str(jsonl), text_field="body")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(SinkquantError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(SinkquantError, match="unsupported suffix '.xlsx'; valid: .txt"):
        load_text(str(odd))


def test_offline_without_local_copy_says_how_to_supply_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SINKQUANT_WIKITEXT2"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = "from sinkquant.data import load_text; load_text('wikitext2')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "SINKQUANT_WIKITEXT2=path/to/wiki.test.raw" in proc.stderr


def test_window_plan_is_disjoint() -> None:
    stream = TokenStream(ids=torch.arange(1000), text_sha256="x", source={})
    plan = plan_windows(stream, ctx=100, max_windows=4, calib_windows=3)
    assert plan.eval_windows == (0, 1, 2, 3)
    assert plan.calib_windows == (7, 8, 9)
    assert plan.describe()["disjoint"]
    assert stream.windows(100, [1])[0, 0].item() == 100
    full = plan_windows(stream, ctx=100, calib_windows=2)
    assert full.eval_windows == tuple(range(8))
    with pytest.raises(SinkquantError, match="shorter than one window of ctx=2000"):
        plan_windows(stream, ctx=2000)
    with pytest.raises(SinkquantError, match="too few for 10 calibration windows"):
        plan_windows(stream, ctx=100, calib_windows=10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ctx": 0}, "ctx=0 is too small; it must be at least 2 tokens"),
    ({"ctx": -5}, "ctx=-5 is too small"),
    ({"ctx": 100, "max_windows": -1}, "max_windows=-1 must be at least 1"),
    ({"ctx": 100, "max_windows": 0}, "max_windows=0 must be at least 1"),
    ({"ctx": 100, "calib_windows": -2}, "calib_windows=-2 must be 0 or more"),
])
def test_window_plan_refuses_nonsense(kwargs, message) -> None:
    """Refused when planned, not after calibration ("no tokens were scored") or as a ZeroDivisionError."""
    stream = TokenStream(ids=torch.arange(1000), text_sha256="x", source={})
    with pytest.raises(SinkquantError, match=message):
        plan_windows(stream, **kwargs)
    if "max_windows" not in kwargs and "calib_windows" not in kwargs:
        with pytest.raises(SinkquantError, match=message):
            stream.n_windows(kwargs["ctx"])  # profiling plans its own windows from n_windows
