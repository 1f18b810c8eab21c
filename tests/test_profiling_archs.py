"""The profile runs on every architecture the adapter supports (tiny random models) and leaves each model as it
found it: same attention implementation, no hooks, same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sinkquant.data import TokenStream
from sinkquant.errors import SinkquantError
from sinkquant.io import to_json
from sinkquant.models import LoadedModel
from sinkquant.profiling.collectors import ProfileCollector
from sinkquant.profiling.profiler import SCHEMA, SCHEMA_VERSION, profile
from tests.tiny import ARCHS, tiny_model

CTX = 32


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_profile_every_arch(arch: str, smollm2: LoadedModel, wikitext_stream: TokenStream, tmp_path: Path) -> None:
    loaded = tiny_model(arch, smollm2.tokenizer)
    ids = wikitext_stream.ids[:CTX][None]
    impl = loaded.model.config._attn_implementation
    with torch.no_grad():
        before = loaded.model(ids).logits
    report = profile(loaded, wikitext_stream, ctx=CTX, windows=2, bos="per-window", out=tmp_path / "r",
                     progress=False)
    with torch.no_grad():
        after = loaded.model(ids).logits
    assert loaded.model.config._attn_implementation == impl
    assert _hooks(loaded.model) == 0
    assert torch.equal(before, after)

    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    heads = loaded.model.config.num_attention_heads
    assert report["schema"] == SCHEMA and report["schema_version"] == SCHEMA_VERSION
    assert report["ctx"] == CTX and report["bos"]["added"] is True
    assert report["data"]["calib_windows"] == 2 and len(report["data"]["calib_window_indices"]) == 2
    assert len(report["residual"]["layers"]) == n_layers
    assert all(len(row["top"]) == 3 and row["median_abs"] > 0 for row in report["residual"]["layers"])
    assert len(report["attention"]["alpha0"]) == n_layers and len(report["attention"]["alpha0"][0]) == heads
    assert all(0 <= a <= 1 for row in report["attention"]["alpha0"] for a in row)
    assert 0 <= report["attention"]["sink_rate"]["0.3"] <= 100
    assert set(report["linears"]) == set(loaded.adapter.linear_layers(loaded.model))
    assert len(report["token_outliers"]["position_ratio_mean"]) == CTX + 1
    verdict = report["verdict"]
    assert verdict["prefix_ids"][0] == loaded.bos_id
    assert {"sink_positions", "sink_token_ids", "peak_channels", "broken_linears", "origin"} <= set(verdict)
    assert report["probe"]["bos_test"]["bos_id"] == loaded.bos_id
    written = json.loads((tmp_path / "r" / "report.json").read_text())
    assert written == json.loads(to_json(report))
    assert (tmp_path / "r" / "report.html").read_text().count("data:image/png;base64,") == 5
    assert len(list((tmp_path / "r" / "plots").glob("*.png"))) == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_attention_matches_native(arch: str, smollm2: LoadedModel, wikitext_stream: TokenStream) -> None:
    """The custom attention function must not change what the model computes."""
    loaded = tiny_model(arch, smollm2.tokenizer)
    ids = wikitext_stream.ids[:CTX]
    with torch.no_grad():
        native = loaded.model(ids[None]).logits[0, -1]
    with ProfileCollector(loaded, str) as collector:
        probed = collector.run(ids)
    assert collector.windows == 1 and collector.sink_rates["0.3"]  # the probe did see the attention
    assert torch.allclose(native, probed, atol=1e-5)


def test_interrupted_profile_leaves_nothing(smollm2: LoadedModel, wikitext_stream: TokenStream,
                                            tmp_path: Path) -> None:
    loaded = tiny_model("llama", smollm2.tokenizer)
    calls = []

    def interrupt(module: torch.nn.Module, args: object, output: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = loaded.model.model.norm.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        profile(loaded, wikitext_stream, ctx=CTX, windows=3, out=tmp_path / "r", progress=False)
    handle.remove()
    assert list(tmp_path.iterdir()) == []
    assert loaded.model.config._attn_implementation == "sdpa"
    assert _hooks(loaded.model) == 0


def test_text_of_exactly_the_calibration_windows(smollm2: LoadedModel, wikitext_stream: TokenStream) -> None:
    """A recipe profiles its own calibration windows: no evaluation window is needed, too few is an error."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    stream = TokenStream(ids=wikitext_stream.ids[: 2 * CTX], text_sha256="x", source={"kind": "calibration"})
    report = profile(loaded, stream, ctx=CTX, windows=2, progress=False, probe=False)
    assert report["data"]["calib_window_indices"] == [0, 1] and report["data"]["eval_windows"] == 0
    # the costly paper sections are opt-in: a recipe's own profile pays nothing for them
    assert report["domains"] is None and report["interventions"] is None and report["context_sweep"] is None
    with pytest.raises(SinkquantError, match="fewer than windows=3"):
        profile(loaded, stream, ctx=CTX, windows=3, progress=False)
