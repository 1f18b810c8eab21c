"""`compare`: one shared fp32 baseline, cached rows, a failing recipe reported without sinking the others."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sinkquant.comparison import compare, write_comparison

CTX = 64


def test_compare_caches_and_reports_failures(smollm2, wikitext_stream, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"name": "broken", "description": "bad", "scheme": {"weights": {"bits": 9}}}))
    recipes = ["recipes/w8a8-naive.yaml", "recipes/w8a8-dynamic-token.yaml", str(broken)]
    cache = tmp_path / "cache"
    first = compare(smollm2, recipes, wikitext_stream, ctx=CTX, max_windows=2, cache_dir=cache, progress=False)
    rows = {r["recipe"]: r for r in first["rows"]}
    assert list(rows) == ["fp32", "w8a8-naive", "w8a8-dynamic-token", "broken"]
    assert rows["broken"]["status"] == "failed" and "bits=9 is not valid" in rows["broken"]["error"]
    assert rows["w8a8-naive"]["ppl"] > rows["w8a8-dynamic-token"]["ppl"] > 0
    assert rows["w8a8-naive"]["delta_pct"] > 0
    assert not any(r["cached"] for r in first["rows"])

    second = compare(smollm2, recipes, wikitext_stream, ctx=CTX, max_windows=2, cache_dir=cache, progress=False)
    again = {r["recipe"]: r for r in second["rows"]}
    assert again["w8a8-naive"]["cached"] and again["fp32"]["cached"]
    assert again["w8a8-naive"]["ppl"] == rows["w8a8-naive"]["ppl"]

    paths = write_comparison(second, tmp_path / "out")
    assert {p.name for p in paths} == {"compare.md", "compare.json", "compare.csv", "compare.png"}
    assert "w8a8-naive" in (tmp_path / "out" / "compare.md").read_text()
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["settings"]["ctx"] == CTX
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"
