"""The answer a recipe needs from a profile: which positions and token ids are sinks, which channels hold their
peaks, which Linear inputs they break, and the PrefixQuant prefix to put in front of every sequence.

Sinks are ranked, strongest first, so a user (and the auto recipe) can act on the first few: by the share of
attention heads for which they are a sink, then their attention mass, then their residual peak. The `top_*`
lists are what a report shows (those above the stated cut-off, at most TOP entries); the full lists stay."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sinkquant.profiling import metrics

# A per-tensor int8 scale stretched 4x by the sinks loses 2 of its 8 bits on every other token.
BREAK_STRETCH = 4.0
MAJORITY_SINK_RATE = 50.0
TOP = 5
# A sink makes the top view when most heads attend to it (share >= 0.5) or its residual peak is at least a
# tenth of the strongest sink's: a peak 10x smaller costs a per-tensor int8 scale < 3.3 bits less.
TOP_HEAD_SHARE = 0.5
TOP_PEAK_FRACTION = 0.1
SINK_CUTOFF = (f"head share >= {TOP_HEAD_SHARE} or residual peak >= {TOP_PEAK_FRACTION} x the strongest sink's, "
               f"in at least half the windows; at most {TOP} shown")
CONTENT_CUTOFF = f"massive in at least half as many occurrences as windows, or a sink wherever the probe put it; " \
                 f"at most {TOP} shown"


@dataclass(frozen=True)
class Verdict:
    """What a profile concludes for the recipes: stored as `report["verdict"]` (JSON), read back with `of`."""

    sink_positions: list[int] = field(default_factory=list)
    sink_token_ids: list[int] = field(default_factory=list)
    sink_tokens: list[str] = field(default_factory=list)
    peak_channels: list[int] = field(default_factory=list)
    broken_linears: list[dict[str, Any]] = field(default_factory=list)
    outlier_token_count: int = 0
    prefix_ids: list[int] = field(default_factory=list)
    prefix_tokens: list[str] = field(default_factory=list)
    origin: str = ""
    # Ranked views (strongest first): every position / id seen, and the top ones above the cut-off.
    sinks: list[dict[str, Any]] = field(default_factory=list)
    top_sinks: list[dict[str, Any]] = field(default_factory=list)
    sink_cutoff: str = SINK_CUTOFF
    content_sinks: list[dict[str, Any]] = field(default_factory=list)
    top_content_sinks: list[dict[str, Any]] = field(default_factory=list)
    content_cutoff: str = CONTENT_CUTOFF
    # PrefixQuant's candidates: outlier token ids outside position 0, most frequent first (BOS excluded).
    prefix_candidates: list[dict[str, Any]] = field(default_factory=list)
    prefix_bos: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, report: dict[str, Any]) -> Verdict:
        """The verdict of a profile report (a report written to JSON and read back holds it as a dict; a caller's
        partial verdict reads its missing fields as empty)."""
        return cls(**report["verdict"])


def _position_peaks(summary: dict[str, Any]) -> dict[int, float]:
    """Each position's largest residual |h| / median over layers, from the per-layer top entries."""
    peaks: dict[int, float] = {}
    for layer in summary["residual"]["layers"]:
        median = layer["median_abs"]
        for top in layer["top"]:
            if median > 0:
                ratio = top["value"] / median
                peaks[top["position"]] = max(peaks.get(top["position"], 0.0), ratio)
    return peaks


def rank_sinks(summary: dict[str, Any], windows: int) -> list[dict[str, Any]]:
    """Every position that is massive in some window, a hidden sink, or position 0, strongest first.
    head_share and attention_mass are measured for position 0 (alpha_0 per head); a hidden sink's
    attention_mass is its largest column mean; a field the profile does not measure is None."""
    att = summary["attention"]
    massive = {p["position"]: p["windows"] for p in summary["residual"]["massive_positions"]}
    hidden = {h["position"]: h for h in att["hidden_sinks"]}
    peaks = _position_peaks(summary)
    rows = []
    for position in sorted({0, *massive, *hidden}):
        head_share = attention = None
        if position == 0:
            alpha0 = [a for layer in att["alpha0"] for a in layer]
            head_share = sum(a > metrics.SINK_EPS[0] for a in alpha0) / max(len(alpha0), 1)
            attention = sum(alpha0) / max(len(alpha0), 1)
        elif position in hidden:
            attention = hidden[position]["max_column_mean"]
        rows.append({"position": position, "head_share": head_share, "attention_mass": attention,
                     "residual_peak": peaks.get(position), "massive_windows": massive.get(position, 0) / windows})
    return sorted(rows, key=lambda r: (-(r["head_share"] or 0.0), -(r["attention_mass"] or 0.0),
                                       -(r["residual_peak"] or 0.0), r["position"]))


def top_sinks(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ranked sinks above SINK_CUTOFF, at most TOP."""
    strongest = max((r["residual_peak"] or 0.0 for r in ranked), default=0.0)
    return [r for r in ranked
            if r["massive_windows"] >= 0.5 and ((r["head_share"] or 0.0) >= TOP_HEAD_SHARE
                                                or (r["residual_peak"] or 0.0) >= TOP_PEAK_FRACTION * strongest)
            ][:TOP]


def build_verdict(summary: dict[str, Any], outlier_ids: Counter[int], windows: int, bos_id: int | None,
                  probe: dict[str, Any] | None, decode: Callable[[int], str],
                  bos_trained: bool | None = None) -> Verdict:
    """Sink positions: massive in at least half the windows, plus 0 when most heads put > 0.3 on it (Gu et al.).
    Sink ids: ids massive outside position 0 in at least half as many occurrences as windows, plus ids the
    probe showed to become sinks wherever they stand. Prefix: PrefixQuant's rule (metrics.md item 2), with
    BOS only where the model is trained with one (`bos_trained`, from models.bos_evidence; None:
    unknown, PrefixQuant's own rule of BOS whenever the tokenizer names one)."""
    residual = summary["residual"]
    positions = {p["position"] for p in residual["massive_positions"] if 2 * p["windows"] >= windows}
    if summary["attention"]["sink_rate"][str(metrics.SINK_EPS[0])] >= MAJORITY_SINK_RATE:
        positions.add(0)
    probed = list((probe or {}).get("content_sink_ids", []))
    ids = [t["id"] for t in residual["massive_token_ids"] if 2 * t["count"] >= windows]
    ids += [i for i in probed if i not in ids]
    content = [{"id": t["id"], "token": decode(t["id"]), "count": t["count"], "seen": t["seen"],
                "frequency": t["count"] / t["seen"] if t["seen"] else None, "probe_sink": t["id"] in probed}
               for t in residual["massive_token_ids"]]
    content += [{"id": i, "token": decode(i), "count": 0, "seen": None, "frequency": None, "probe_sink": True}
                for i in probed if i not in {c["id"] for c in content}]
    counts = residual["massive_channels"]
    channels = [c["channel"] for c in counts if counts and 10 * c["count"] >= counts[0]["count"]][:3]
    broken = sorted(
        ({"name": name, "int8_stretch": row["int8_stretch"]} for name, row in summary["linears"].items()
         if row["int8_stretch"] is not None and row["int8_stretch"] >= BREAK_STRETCH),
        key=lambda r: (-r["int8_stretch"], r["name"]),
    )
    o = summary["token_outliers"]["o"]
    use_bos = bos_id is not None and bos_trained is not False
    content_ids = Counter({i: n for i, n in outlier_ids.items() if i != bos_id})
    prefix = metrics.prefix_ids(content_ids, o, bos_id if use_bos else None)
    candidates = [{"id": i, "token": decode(i), "count": n} for i, n in
                  sorted(content_ids.items(), key=lambda e: (-e[1], e[0]))]
    ranked = rank_sinks(summary, windows)
    return Verdict(
        sink_positions=sorted(positions), sink_token_ids=ids, sink_tokens=[decode(i) for i in ids],
        peak_channels=channels, broken_linears=broken, outlier_token_count=o, prefix_ids=prefix,
        prefix_tokens=[decode(i) for i in prefix], origin=(probe or {}).get("origin", "not probed"),
        sinks=ranked, top_sinks=top_sinks(ranked),
        content_sinks=content, top_content_sinks=[c for c in content if c["id"] in ids][:TOP],
        prefix_candidates=candidates[:20],
        prefix_bos=("no BOS token" if bos_id is None else "BOS first: the model is trained with it" if
                    bos_trained else "BOS first: PrefixQuant's rule (training convention not checked)" if
                    bos_trained is None else "no BOS: the model is not trained with one"),
    )


# The shipped static W8A8 recipes the report recommends, by whether the profile finds content sinks, with what each
# cost on the models it was checked on (RESULTS: `sinkquant compare` with every shipped static W8A8 recipe on
# SmolLM2 and the held-out Gemma 3 and Qwen2.5, ctx 512, 8 windows). A sink chosen by position alone is absorbed by
# the prefix; content sinks recur through the text, and attention calibration (ACT) damps what they draw.
RECOMMENDED = "w8a8-prefix-smooth-except"
# A content sink calls for ACT when the probe made it a sink wherever it stood, or it is massive at most of its
# occurrences (one massive ' ,' in three, as in a single SmolLM2 window, is no pattern).
CONTENT_SINK_FREQUENCY = 0.5
RECOMMENDED_CONTENT_SINKS = "w8a8-prefix-smooth-except-act"
COSTS = {
    RECOMMENDED: ("+1.3% perplexity on SmolLM2-135M and -1.1% on the held-out Qwen2.5-Coder 0.5B, the checked models "
                  "whose only sink is token 0 (WikiText-2, ctx 512, 8 windows); static per-tensor int8 everywhere but "
                  "the 8 widest Linear inputs, plus the prefix's fp KV"),
    RECOMMENDED_CONTENT_SINKS: ("+8.5% perplexity on the held-out Gemma 3 270M, the checked model with content sinks "
                                "(WikiText-2, ctx 512, 8 windows; +8.9% without ACT); static per-tensor int8 "
                                "everywhere but the 8 widest Linear inputs, plus the prefix's fp KV; where that is "
                                "too much, --recipe auto reached +1.2% there"),
}
AUTO_COST = ("searches prefix, rotation, smoothing, exception layers and clipping on calibration windows: within "
             "+3% of fp32 on all six held-out model x text cells, about 2.5x the fixed recipe's quantize time")
RESULTS = "eval/results/recommendation.md"


def _data_flag(report: dict[str, Any]) -> str:
    """The --data value that names the profiled text again."""
    data = report["data"]
    if str(data.get("dataset", "")).startswith("wikitext-2"):
        return "wikitext2"
    return str(data.get("path") or data.get("name") or "TEXT")


def _sink_peak(report: dict[str, Any], position: int) -> dict[str, Any] | None:
    """The largest residual |h| a position reaches, its channel, and the layers where it is massive."""
    rows = [(layer["layer"], top, layer["median_abs"]) for layer in report["residual"]["layers"]
            for top in layer["top"] if top["position"] == position]
    if not rows:
        return None
    layer, top, _ = max(rows, key=lambda r: r[1]["value"])
    massive = sorted({r[0] for r in rows if r[1]["value"] >= max(metrics.MASSIVE_ABS, metrics.MASSIVE_RATIO * r[2])})
    medians = [r[2] for r in rows if r[0] in massive] or [rows[0][2]]
    return {"value": top["value"], "channel": top["channel"], "layer": layer, "token": top["token"],
            "massive_layers": massive, "median": sorted(medians)[len(medians) // 2]}


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """The report's advice: a shipped recipe to start from, the `--recipe auto` command, what each costs, and the
    reasons, read from the profile. One recipe is recommended for every profile: on the three models it was checked
    on it is the best shipped static W8A8 recipe (RESULTS); the reasons say which of its steps the profile calls
    for. `findings` are the short summary sentences the report opens with."""
    verdict = Verdict.of(report)
    spec, ctx, data = report["model"]["spec"], report["ctx"], _data_flag(report)
    findings, reasons = [], []
    rates = report["attention"]["sink_rate"]
    top, sinks = verdict.top_sinks, verdict.sink_positions
    position = top[0]["position"] if top else (sinks or [0])[0]
    others = [p for p in sinks if p != 0]
    shown = ", ".join(map(str, others[:TOP])) + (f" and {len(others) - TOP} more" if len(others) > TOP else "")
    findings.append(f"{rates['0.3']:.0f}% of attention heads put more than 0.3 of their attention on token 0"
                    + (f"; other sink positions: {shown}." if others else "."))
    peak = _sink_peak(report, position)
    if peak and peak["massive_layers"]:
        layers = peak["massive_layers"]
        span = f"layer {layers[0]}" + (f" to {layers[-1]}" if layers[-1] != layers[0] else "")
        findings.append(f"Token {position} carries |h| {peak['value']:,.0f} in channel {peak['channel']} from "
                        f"{span} (median |h| there {peak['median']:.3g}): one per-tensor int8 scale stretched to "
                        "cover it leaves ordinary tokens a few levels.")
        first = f" ({verdict.prefix_tokens[0]!r})" if verdict.prefix_tokens else ""
        reasons.append(f"token {position} carries |h| {peak['value']:,.0f} in channel {peak['channel']} from layer "
                       f"{layers[0]}: a one-token prefix{first} whose KV is computed once in full precision "
                       "takes the sink's place, so no quantized activation holds it")
    else:
        findings.append("No massive residual activation at the sink: per-tensor scales are not stretched by it.")
    broken = verdict.broken_linears
    total = report["model"].get("linear_inputs")
    if broken:
        worst = broken[0]
        findings.append(f"{len(broken)} of {total} Linear inputs have their int8 scale stretched 4x or more by the "
                        f"sinks; the worst, {worst['name']}, {worst['int8_stretch']:.0f}x.")
        if reasons:
            reasons[-1] += f"; that also undoes the stretch at those {len(broken)} Linear inputs"
    else:
        findings.append("No Linear input has its int8 scale stretched 4x or more by the sinks.")
    widths = {name: row["absmax_without_sinks"] for name, row in report["linears"].items()
              if row.get("absmax_without_sinks") is not None}
    if widths:
        widest = max(widths, key=widths.get)
        median = sorted(widths.values())[len(widths) // 2]
        reasons.append(f"without the sinks the widest Linear input still reaches |x| {widths[widest]:.3g} "
                       f"({widest}) against a median of {median:.2g}: smoothing moves such channels into the "
                       "weights, and the 8 widest inputs keep full precision")
    recipe = RECOMMENDED
    content = [c for c in verdict.top_content_sinks
               if c["probe_sink"] or (c["frequency"] or 0.0) >= CONTENT_SINK_FREQUENCY]
    if content:
        tokens = ", ".join(repr(c["token"]) for c in content)
        findings.append(f"Content sinks (massive wherever they stand): {tokens}.")
        recipe = RECOMMENDED_CONTENT_SINKS
        reasons.append(f"content sinks ({tokens}) recur all through the text, where no prefix reaches them: "
                       "attention calibration (ACT) lowers the attention heads pour onto them before smoothing "
                       "measures the Linear inputs")
    findings.append(f"Sinks are chosen by {verdict.origin} (origin probe).")
    command = f"sinkquant quantize --model {spec} --data {data} --ctx {ctx} --recipe recipes/{recipe}.yaml " \
              f"--out out/{recipe}"
    auto = f"sinkquant quantize --model {spec} --data {data} --ctx {ctx} --recipe auto --out out/auto"
    return {"recipe": recipe, "command": command, "cost": COSTS[recipe], "reasons": reasons,
            "auto_command": auto, "auto_cost": AUTO_COST, "evidence": RESULTS, "findings": findings}
