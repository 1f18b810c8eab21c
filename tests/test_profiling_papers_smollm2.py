"""The papers' findings on the real SmolLM2-135M: zeroing the massive activations destroys the model while their
mean leaves it unchanged (Sun et al.); token 0 is the sink at every context length from the one where it forms
(Barbero et al.); some heads are dormant on a list of numbers and active on WikiText, or the reverse (Guo et al.);
the sink is chosen by position from the layer where the massive activations appear (Yan et al.)."""

from __future__ import annotations

import pytest

from sinkquant.data import TokenStream, tokenize
from sinkquant.models import LoadedModel
from sinkquant.profiling.domains import numbers_text
from sinkquant.profiling.profiler import profile

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
LENGTHS = (2, 4, 16, 64, 256, 1024)  # 2048 as well in eval/bench_papers.py; it costs as much as the rest together




@pytest.fixture(scope="module")
def report(smollm2: LoadedModel, wikitext_stream: TokenStream, tmp_path_factory: pytest.TempPathFactory) -> dict:
    numbers = tokenize(numbers_text(), smollm2.tokenizer)
    out = tmp_path_factory.mktemp("papers") / "smollm2"
    result = profile(smollm2, {"wikitext": wikitext_stream, "numbers": numbers}, ctx=256, windows=2, bos="never",
                     out=out, progress=False, interventions=True, context_lengths=LENGTHS)
    result["_out"] = out
    return result


def test_zeroing_massive_activations_destroys_the_model_their_mean_does_not(report: dict) -> None:
    intervention = report["interventions"]
    assert intervention["layer"] == report["residual"]["appear_layer"] <= 12
    assert intervention["channels"][0] == 507 and all(n >= 1 for n in intervention["entries_per_window"])
    ratio = intervention["ratio_vs_fp32"]
    assert ratio["zero"] > 100  # orders of magnitude (measured x116,880 at ctx 512 x 4 windows)
    assert abs(ratio["mean"] - 1) < 0.03 and abs(ratio["random_zero"] - 1) < 0.03


def test_token0_is_the_sink_at_every_length_from_where_it_forms(report: dict) -> None:
    sweep = report["context_sweep"]
    assert sweep["lengths"] == list(LENGTHS)
    for mode in ("no_bos", "bos"):
        forms = sweep[mode]["forms_at"]
        assert forms == 2  # token 0 is already the sink of a two-token sequence (measured)
        for row in sweep[mode]["rows"]:
            if row["length"] >= forms:
                assert row["formed"] and row["sink_rate"] > 40
                assert row["mean_first_token_attention"] > row["uniform_share"] * (2 if row["length"] >= 16 else 1)
                assert min(row["token0_massive_layers"]) <= 12 and max(row["residual_peak"]) > 1000
    # Barbero et al.: the share of attention on token 0 in the deep layers grows as the context shortens
    deep = [sum(r["first_token_attention"][12:27]) for r in sweep["no_bos"]["rows"]]
    assert deep[0] > deep[-1]


def test_heads_dormant_on_one_domain_are_active_on_another(report: dict) -> None:
    domains = report["domains"]
    assert domains["texts"] == ["wikitext", "numbers"]
    switching = domains["switching_heads"]
    assert len(switching) >= 5
    assert {tuple(r["dormant_on"]) for r in switching} >= {("numbers",)}
    top = switching[0]
    assert top["alpha0_gap"] > 0.3 and min(top["alpha0"].values()) < 0.8 <= max(top["alpha0"].values())
    assert domains["data"]["numbers"]["generator"] == "numbers_text"


def test_waiver_element_is_chosen_by_position_from_the_peak_layer(report: dict) -> None:
    per_layer = report["probe"]["per_layer"]
    assert per_layer["position_from_layer"] == report["residual"]["appear_layer"]
    assert per_layer["layers"][: per_layer["position_from_layer"]] == ["none"] * per_layer["position_from_layer"]
    assert per_layer["layers"][per_layer["position_from_layer"] + 1] in ("position", "position+content")


def test_sections_are_in_the_files(report: dict) -> None:
    folder = report["_out"]
    html = (folder / "report.html").read_text()
    md = (folder / "report.md").read_text()
    for text in (html, md):
        assert "Interventions on massive activations" in text and "forms at length" in text
    assert (folder / "plots" / "context_sweep.png").stat().st_size > 10_000
