"""The ranked verdict on a hand-made profile summary (every number chosen so the expected ranking is known),
and on the real SmolLM2 profile."""

from __future__ import annotations

from collections import Counter

import pytest

from sinkquant.profiling.verdict import TOP, build_verdict, rank_sinks, top_sinks


def _summary(windows: int = 4) -> dict:
    """Position 0: a sink for 3 of 4 heads; position 7: a strong massive peak in every window; position 30:
    a weak peak (1/20 of the strongest) in every window; position 12: massive in one window only."""
    layers = [
        {"median_abs": 1.0, "top": [{"value": 2000.0, "position": 7}, {"value": 1500.0, "position": 0},
                                    {"value": 100.0, "position": 30}]},
        {"median_abs": 2.0, "top": [{"value": 600.0, "position": 12}, {"value": 10.0, "position": 40}]},
    ]
    return {
        "residual": {
            "layers": layers,
            "massive_positions": [{"position": 7, "windows": windows}, {"position": 0, "windows": windows},
                                  {"position": 30, "windows": windows}, {"position": 12, "windows": 1}],
            "massive_token_ids": [{"id": 11, "count": 4, "seen": 8}, {"id": 13, "count": 1, "seen": 50}],
            "massive_channels": [{"channel": 5, "count": 9}],
        },
        "attention": {
            "sink_rate": {"0.3": 75.0},
            "alpha0": [[0.9, 0.5], [0.4, 0.1]],
            "hidden_sinks": [{"position": 7, "windows": 3, "max_column_mean": 0.2}],
        },
        "linears": {"model.layers.0.mlp.down_proj": {"int8_stretch": 9.0},
                    "model.layers.0.self_attn.q_proj": {"int8_stretch": 1.5}},
        "token_outliers": {"o": 2},
    }


def _verdict(bos_trained: bool | None):
    return build_verdict(_summary(), Counter({11: 6, 9: 6, 1: 9, 20: 2}), windows=4, bos_id=1,
                         probe={"origin": "position+content", "content_sink_ids": [42]},
                         decode=lambda i: f"<{i}>", bos_trained=bos_trained)


def test_sinks_are_ranked_by_head_share_then_attention_then_peak() -> None:
    ranked = rank_sinks(_summary(), windows=4)
    assert [r["position"] for r in ranked] == [0, 7, 12, 30]  # 40 is neither massive nor a hidden sink
    first = ranked[0]
    assert first["head_share"] == pytest.approx(0.75)  # 3 of 4 heads above eps 0.3
    assert first["attention_mass"] == pytest.approx((0.9 + 0.5 + 0.4 + 0.1) / 4)
    assert ranked[1]["attention_mass"] == 0.2 and ranked[1]["residual_peak"] == 2000.0
    assert ranked[2]["residual_peak"] == 300.0 and ranked[2]["massive_windows"] == 0.25


def test_top_view_applies_the_stated_cutoff() -> None:
    top = [r["position"] for r in top_sinks(rank_sinks(_summary(), windows=4))]
    # 30's peak is 1/20 of the strongest (below 1/10); 12 is massive in 1 of 4 windows only.
    assert top == [0, 7]
    assert len(top) <= TOP


def test_content_sinks_carry_their_frequency() -> None:
    verdict = _verdict(True)
    by_id = {c["id"]: c for c in verdict.content_sinks}
    assert by_id[11]["frequency"] == 0.5 and by_id[13]["frequency"] == 0.02
    assert by_id[42]["probe_sink"] and by_id[42]["count"] == 0
    assert [c["id"] for c in verdict.top_content_sinks] == [11, 42]  # 13: one massive occurrence in 4 windows
    assert verdict.sink_token_ids == [11, 42]  # the existing field keeps its meaning


def test_prefix_takes_bos_only_where_the_model_is_trained_with_it() -> None:
    assert _verdict(True).prefix_ids == [1, 9, 11]  # BOS, then the o=2 most frequent ids (tie: smaller id)
    assert _verdict(None).prefix_ids == [1, 9, 11]  # unknown convention: PrefixQuant's rule
    untrained = _verdict(False)
    assert untrained.prefix_ids == [9, 11]
    assert "not trained" in untrained.prefix_bos
    assert [c["id"] for c in untrained.prefix_candidates] == [9, 11, 20]  # BOS never a content candidate


def test_existing_fields_still_hold() -> None:
    verdict = _verdict(True).to_dict()
    assert verdict["sink_positions"] == [0, 7, 30]
    assert verdict["broken_linears"] == [{"name": "model.layers.0.mlp.down_proj", "int8_stretch": 9.0}]
    assert verdict["peak_channels"] == [5] and verdict["origin"] == "position+content"


def test_smollm2_profile_ranks_position_zero_first(smollm2, wikitext_stream) -> None:
    from sinkquant.profiling.profiler import profile

    report = profile(smollm2, wikitext_stream, ctx=128, windows=2, progress=False, probe=False, bos="never")
    verdict = report["verdict"]
    assert verdict["top_sinks"][0]["position"] == 0
    assert verdict["top_sinks"][0]["head_share"] > 0.3  # 0.47 measured at ctx 128, 2 windows
    assert len(verdict["top_sinks"]) <= TOP
    assert {r["position"] for r in verdict["top_sinks"]} <= {r["position"] for r in verdict["sinks"]}
