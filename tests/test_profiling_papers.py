"""The papers' sections of the profile on tiny random models of every architecture: several named texts (Guo et
al.), interventions on massive activations (Sun et al.), the context-length sweep (Barbero et al.) and the
per-layer waiver probe (Yan et al.); plus the pure pieces on hand-made tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sinkquant.data import TokenStream, tokenize
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel
from sinkquant.profiling.context import context_sweep, uniform_share
from sinkquant.profiling.domains import domain_heads, numbers_text
from sinkquant.profiling.interventions import _Intervention, massive_interventions
from sinkquant.profiling.profiler import profile
from sinkquant.profiling.report import _runs
from tests.tiny import ARCHS, tiny_model

CTX = 32
PLANTED = 3  # the channel given a massive value in every token's embedding


@pytest.fixture(scope="module")
def numbers_stream(smollm2: LoadedModel) -> TokenStream:
    return tokenize(numbers_text(500), smollm2.tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_sections_every_arch(arch: str, smollm2: LoadedModel, wikitext_stream: TokenStream,
                                   numbers_stream: TokenStream, tmp_path: Path) -> None:
    loaded = tiny_model(arch, smollm2.tokenizer)
    report = profile(loaded, {"wikitext": wikitext_stream, "numbers": numbers_stream}, ctx=CTX, windows=2,
                     bos="per-window", out=tmp_path / "r", progress=False, context_lengths=(4, 16, 64),
                     interventions=True)
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    heads = loaded.model.config.num_attention_heads
    domains = report["domains"]
    assert domains["texts"] == ["wikitext", "numbers"]
    for name in domains["texts"]:
        assert len(domains["alpha0"][name]) == n_layers and len(domains["alpha0"][name][0]) == heads
        assert all(0 <= a <= 1 for row in domains["alpha0"][name] for a in row)
    # the first text's numbers are the full profile's own
    assert domains["alpha0"]["wikitext"] == report["attention"]["alpha0"]
    assert domains["data"]["numbers"]["sha256"] == numbers_stream.text_sha256
    assert domains["alpha0"]["numbers"] != domains["alpha0"]["wikitext"]

    sweep = report["context_sweep"]
    assert sweep["lengths"] == [4, 16, 64] and set(sweep) >= {"no_bos", "bos"}
    for mode in ("no_bos", "bos"):
        rows = sweep[mode]["rows"]
        assert [r["length"] for r in rows] == [4, 16, 64]
        assert all(len(r["first_token_attention"]) == n_layers == len(r["residual_peak"]) for r in rows)
        assert all(0 <= r["sink_rate"] <= 100 for r in rows)
    # causal attention: every query sees token 0, so a 4-token sequence gives token 0 at least a quarter on average
    assert min(sweep["no_bos"]["rows"][0]["first_token_attention"]) >= 0.25 - 1e-6

    per_layer = report["probe"]["per_layer"]
    assert len(per_layer["layers"]) == n_layers
    assert set(per_layer["layers"]) <= {"position", "content", "position+content", "none"}
    # random models carry no massive activation: the intervention says so instead of inventing entries
    assert report["interventions"]["layer"] is None and "no massive" in report["interventions"]["note"]

    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7
    assert {"domain_heads.png", "context_sweep.png"} <= {p.name for p in (tmp_path / "r" / "plots").iterdir()}
    for title in ("active and dormant heads", "Sink vs context length", "Waiver element per layer"):
        assert title in html
    assert json.loads((tmp_path / "r" / "report.json").read_text())["context_sweep"]["lengths"] == [4, 16, 64]


@pytest.mark.parametrize("arch", ARCHS)
def test_interventions_on_a_planted_massive_channel(arch: str, smollm2: LoadedModel,
                                                    wikitext_stream: TokenStream) -> None:
    """Every token's embedding gets +1000 in one channel: the first layer's output is massive there (Sun's
    criterion) at every position, the hook finds exactly those entries and rewrites them."""
    loaded = tiny_model(arch, smollm2.tokenizer)
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[:, PLANTED] += 1000.0
    windows = (3, 4)
    result = massive_interventions(loaded, wikitext_stream, CTX, windows, "never", 0, [PLANTED, PLANTED + 1])
    assert result["entries_per_window"] == [CTX, CTX]
    assert list(result["mean_values"]) == [str(PLANTED)] and abs(result["mean_values"][str(PLANTED)]) > 100
    ppl = result["perplexity"]
    assert set(ppl) == {"fp32", "zero", "mean", "random_zero"}
    assert all(torch.isfinite(torch.tensor(v)) for v in ppl.values())
    ratio = result["ratio_vs_fp32"]
    # the entries are near-constant, so their mean changes little; zeroing them changes far more
    assert abs(ratio["mean"] - 1) < abs(ratio["zero"] - 1) and ratio["zero"] != 1.0
    again = massive_interventions(loaded, wikitext_stream, CTX, windows, "never", 0, [PLANTED])
    assert again["perplexity"] == ppl  # seeded control: the same entries every run
    assert sum(len(m._forward_hooks) for m in loaded.model.modules()) == 0


def test_intervention_hook_rewrites_exactly_the_entries(smollm2: LoadedModel, wikitext_stream: TokenStream) -> None:
    """Seen from a later hook on the same layer: zero and mean rewrite the planted channel at every position, the
    control zeroes as many entries elsewhere."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[:, PLANTED] += 1000.0
    hook = _Intervention([PLANTED], seed=0)
    seen: dict[str, torch.Tensor] = {}
    mode = ["record"]
    layer = loaded.model.model.layers[0]
    handles = [layer.register_forward_hook(hook),
               layer.register_forward_hook(lambda m, a, out: seen.__setitem__(mode[0], out[0].clone()))]
    ids = wikitext_stream.ids[:CTX][None]
    for mode[0] in ("record", "zero", "mean", "random_zero"):
        hook.start(mode[0])
        with torch.no_grad():
            loaded.model(ids)
    for handle in handles:
        handle.remove()
    fp = seen["record"]
    assert torch.equal(seen["zero"][:, PLANTED], torch.zeros(CTX))
    assert torch.allclose(seen["mean"][:, PLANTED], fp[:, PLANTED].mean().expand(CTX))
    for name in ("zero", "mean"):
        changed = seen[name] != fp
        assert changed[:, PLANTED].sum() >= CTX - 1 and not changed[:, :PLANTED].any()
    changed = seen["random_zero"] != fp
    assert int(changed.sum()) == CTX and not changed[:, PLANTED].any()
    assert torch.equal(seen["random_zero"][changed], torch.zeros(CTX))


def test_domain_heads_lists_a_head_that_switches() -> None:
    alpha = {"a": torch.tensor([[0.95, 0.1], [0.9, 0.2]]), "b": torch.tensor([[0.95, 0.1], [0.2, 0.2]])}
    entropy = {"a": torch.tensor([[0.2, 3.0], [0.5, 3.0]]), "b": torch.tensor([[0.2, 3.0], [2.5, 3.0]])}
    result = domain_heads(alpha, entropy)
    assert result["dormant_heads"] == {"a": [[0, 0], [1, 0]], "b": [[0, 0]]}
    (switch,) = result["switching_heads"]
    assert (switch["layer"], switch["head"], switch["dormant_on"], switch["active_on"]) == (1, 0, ["a"], ["b"])
    assert switch["alpha0_gap"] == pytest.approx(0.7)


def test_uniform_share_is_the_chance_level_of_token_0() -> None:
    assert uniform_share(1) == 1.0 and uniform_share(2) == 0.75
    assert uniform_share(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    t = 2048
    causal = torch.ones(t, t).tril()
    assert uniform_share(t) == pytest.approx(float((causal / causal.sum(-1, keepdim=True))[:, 0].mean()), rel=1e-5)


def test_per_layer_answers_collapse_into_runs() -> None:
    layers = ["none"] * 11 + ["position"] * 17 + ["none"] * 2
    assert _runs(layers) == [["0..10", "none"], ["11..27", "position"], ["28..29", "none"]]
    assert _runs(["content"]) == [["0", "content"]] and _runs([]) == []


def test_numbers_text_is_deterministic() -> None:
    assert numbers_text(100).sha256 == numbers_text(100).sha256
    assert numbers_text(100).sha256 != numbers_text(100, seed=1).sha256
    assert numbers_text(30).text.count("\n") == 3 and numbers_text(30).source["seed"] == 0


def test_bad_paper_inputs(smollm2: LoadedModel, wikitext_stream: TokenStream) -> None:
    loaded = tiny_model("llama", smollm2.tokenizer)
    with pytest.raises(SinkquantError, match="non-empty mapping"):
        profile(loaded, {}, ctx=CTX, windows=1, progress=False)
    with pytest.raises(SinkquantError, match="text name ''"):
        profile(loaded, {"": wikitext_stream}, ctx=CTX, windows=1, progress=False)
    with pytest.raises(SinkquantError, match="'numbers' is a str"):
        profile(loaded, {"wikitext": wikitext_stream, "numbers": "1, 2, 3"}, ctx=CTX, windows=1, progress=False)
    short = TokenStream(ids=wikitext_stream.ids[:CTX], text_sha256="x", source={"kind": "test"})
    with pytest.raises(SinkquantError, match="text 'short': text has 1 windows of ctx=32, fewer than windows=2"):
        profile(loaded, {"wikitext": wikitext_stream, "short": short}, ctx=CTX, windows=2, progress=False)
    with pytest.raises(SinkquantError, match="context_lengths=.* integers >= 2"):
        context_sweep(loaded, wikitext_stream, (1, 16))
    with pytest.raises(SinkquantError, match="all exceed"):
        context_sweep(loaded, wikitext_stream, (4096,))
