"""The profile as files: report.json (versioned, deterministic apart from its "run" section), report.html
(self-contained: tables and base64 PNG plots, opens from disk), report.md, and the plots as PNG files."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sinkquant.io import atomic_dir, to_json  # noqa: E402
from sinkquant.profiling import metrics  # noqa: E402
from sinkquant.profiling.verdict import recommend  # noqa: E402

SCHEMA = "sinkquant.profile"
SCHEMA_VERSION = 1
SIGNIFICANT = 6
TABLE_ROWS = 20


def _round(value: Any) -> Any:
    """Floats to 6 significant digits (non-finite to None), so repeated runs give byte-identical JSON."""
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def finalize(report: dict[str, Any]) -> dict[str, Any]:
    return _round(report)


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _title(report: dict[str, Any], what: str) -> str:
    return f"{what}\n{report['model']['spec']}, ctx {report['ctx']}, {report['data']['calib_windows']} windows"


def plots(report: dict[str, Any]) -> dict[str, bytes]:
    """The figures a reader checks first, as PNG bytes by file name."""
    out: dict[str, bytes] = {}
    layers = report["residual"]["layers"]
    x = [row["layer"] for row in layers]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rank, style in enumerate(("o-", "s--", "^:")):
        ax.plot(x, [row["top"][rank]["value"] if len(row["top"]) > rank else None for row in layers], style,
                label=f"top-{rank + 1} |h|")
    ax.plot(x, [row["median_abs"] for row in layers], "k-", label="median |h|")
    ax.axhline(metrics.MASSIVE_ABS, color="grey", lw=0.8, ls=":", label="100 (massive floor)")
    ax.set(yscale="log", xlabel="decoder layer", ylabel="|h| (residual stream, log)",
           title=_title(report, "Residual-state peaks vs median per layer (Sun et al. 2024)"))
    ax.legend(fontsize=8)
    out["residual_peaks.png"] = _png(fig)

    alpha = report["attention"]["alpha0"]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.45 * len(alpha[0]) + 3), max(4, 0.22 * len(alpha) + 1.5)))
    image = ax.imshow(alpha, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    fig.colorbar(image, ax=ax, label="alpha_0 = mean attention to token 0")
    rates = report["attention"]["sink_rate"]
    ax.set(xlabel="head", ylabel="decoder layer",
           title=_title(report, f"Sink rate per layer x head: Sink_0 = {rates['0.3']:.1f}% (eps 0.3), "
                                f"{rates['0.8']:.1f}% (eps 0.8)"))
    out["sink_rate_heatmap.png"] = _png(fig)

    late = report["attention"]["first_token_late"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.errorbar([r["layer"] for r in late], [r["mean"] for r in late], yerr=[r["std"] for r in late],
                fmt="o-", capsize=3)
    ax.set(ylim=(0, 1.05), xlabel="decoder layer", ylabel="attention to token 0 (mean +- std over heads)",
           title=_title(report, "Attention of late queries to token 0 (StreamingLLM)"))
    out["first_token_attention.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    by_module: dict[str, tuple[list[int], list[float]]] = {}
    for name, row in report["linears"].items():
        if row["int8_stretch"] is not None:
            xs, ys = by_module.setdefault(_module_of(name), ([], []))
            xs.append(row["layer"])
            ys.append(row["int8_stretch"])
    for module, (xs, ys) in sorted(by_module.items()):
        layers, stretches = zip(*sorted(zip(xs, ys, strict=True)), strict=True)
        ax.plot(layers, stretches, "o-", ms=3, label=module)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(yscale="log", xlabel="decoder layer", ylabel="absmax with sinks / without (log)",
           title=_title(report, "Per-tensor int8 scale stretch at each Linear input caused by the sink tokens"))
    ax.legend(fontsize=7, ncol=2)
    out["int8_stretch.png"] = _png(fig)

    ratio = report["token_outliers"]["position_ratio_mean"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(ratio)), ratio, lw=0.8)
    ax.axhline(metrics.TOKEN_OUTLIER_ETA, color="red", ls="--", lw=0.8, label="eta = 64")
    ax.set(yscale="log", xlabel="token position", ylabel="r_t = max_c|X[t]| / median_t (log)",
           title=_title(report, "Token outlier ratio per position at the down projection (PrefixQuant)"))
    ax.legend()
    out["token_outlier_ratio.png"] = _png(fig)
    if report.get("domains"):
        out["domain_heads.png"] = _domain_plot(report)
    if report.get("context_sweep"):
        out["context_sweep.png"] = _sweep_plot(report)
    return out


def _domain_plot(report: dict[str, Any]) -> bytes:
    """Heads x texts: alpha_0 of every head dormant on at least one text (all heads when none is)."""
    domains = report["domains"]
    names = domains["texts"]
    heads = sorted({tuple(lh) for n in names for lh in domains["dormant_heads"][n]})
    if not heads:
        heads = [(layer, head) for layer, row in enumerate(domains["alpha0"][names[0]]) for head in range(len(row))]
    switching = {(r["layer"], r["head"]) for r in domains["switching_heads"]}
    grid = [[domains["alpha0"][n][layer][head] for n in names] for layer, head in heads]
    fig, ax = plt.subplots(figsize=(2.2 + 1.4 * len(names), max(4, 0.16 * len(heads) + 1.8)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="alpha_0 = mean attention to token 0")
    for row, key in enumerate(heads):
        for col, n in enumerate(names):
            if list(key) in domains["dormant_heads"][n]:
                ax.text(col, row, "D", ha="center", va="center", fontsize=6, color="black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(heads)), [f"L{lh[0]}.H{lh[1]}" + (" *" if lh in switching else "") for lh in heads],
                  fontsize=6)
    ax.set(xlabel="text", ylabel="head (* = dormant on one text, active on another)",
           title=f"Dormant (D) and active heads per text (Guo et al.)\n{report['model']['spec']}, ctx "
                 f"{report['ctx']}, {len(switching)} heads switch")
    return _png(fig)


def _sweep_plot(report: dict[str, Any]) -> bytes:
    """Sink rate vs length, and attention to token 0 and its residual peak vs depth at each length; solid lines
    without BOS, dashed with BOS."""
    sweep = report["context_sweep"]
    modes = [m for m in ("no_bos", "bos") if m in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = plt.cm.viridis([i / max(len(sweep["lengths"]) - 1, 1) for i in range(len(sweep["lengths"]))])
    for mode in modes:
        style = "-" if mode == "no_bos" else "--"
        rows = sweep[mode]["rows"]
        axes[0].plot([r["length"] for r in rows], [r["sink_rate"] for r in rows], "o" + style,
                     label=f"{mode.replace('_', ' ')} (forms at {sweep[mode]['forms_at']})")
        for row, color in zip(rows, colors, strict=True):
            label = f"T={row['length']}" if mode == "no_bos" else None
            axes[1].plot(row["first_token_attention"], style, color=color, label=label)
            axes[2].plot(row["residual_peak"], style, color=color, label=label)
    axes[0].set(xscale="log", ylim=(0, 100), xlabel="context length (tokens, log)",
                ylabel=f"sink rate (% heads alpha_0 > {sweep['eps']})", title="Sink rate vs context length")
    axes[1].set(ylim=(0, 1.05), xlabel="decoder layer", ylabel="mean attention to token 0 over heads",
                title="First-token attention vs depth")
    axes[2].set(yscale="log", xlabel="decoder layer", ylabel="max_c|h[0,c]| / median|h| (log)",
                title="Token-0 residual peak vs depth")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"Sink vs context length and BOS (Barbero et al.), {report['model']['spec']}: solid without BOS, "
                 "dashed with BOS")
    return _png(fig)


def _module_of(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'mlp.down_proj': the Linear's path inside its decoder layer."""
    parts = name.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[index + 1 :])


def captions(report: dict[str, Any]) -> dict[str, str]:
    """One line under each plot: what it shows on this model, read from the numbers behind it."""
    residual, att, verdict = report["residual"], report["attention"], report["verdict"]
    tops = [(row["layer"], row["top"][0], row["median_abs"]) for row in residual["layers"] if row["top"]]
    out: dict[str, str] = {}
    if tops:
        layer, top, median = max(tops, key=lambda t: t[1]["value"])
        out["residual_peaks.png"] = (f"The peak is |h| {top['value']:,.0f} at token {top['position']} "
                                     f"({top['token']!r}), channel {top['channel']}, layer {layer}, against a median "
                                     f"|h| of {median:.3g} there; peaks appear at layer {residual['appear_layer']} "
                                     f"and vanish at layer {residual['vanish_layer']}.")
    rates = att["sink_rate"]
    out["sink_rate_heatmap.png"] = (f"{rates['0.3']:.0f}% of heads put more than 0.3 of their attention on token 0, "
                                    f"{rates['0.8']:.0f}% more than 0.8; bright cells are sink heads.")
    late = max(att["first_token_late"], key=lambda r: r["mean"])
    out["first_token_attention.png"] = (f"Late queries attend to token 0 most in layer {late['layer']} (mean "
                                        f"{late['mean']:.2f} over heads, std {late['std']:.2f}).")
    broken = verdict["broken_linears"]
    out["int8_stretch.png"] = (f"{len(broken)} Linear inputs have their per-tensor int8 scale stretched 4x or more "
                               "by the sinks" + (f"; the worst, {broken[0]['name']}, {broken[0]['int8_stretch']:.0f}x."
                                                 if broken else "."))
    prefix = ", ".join(repr(t) for t in verdict["prefix_tokens"]) or "none"
    out["token_outlier_ratio.png"] = (f"{verdict['outlier_token_count']} outlier tokens cross eta = "
                                      f"{metrics.TOKEN_OUTLIER_ETA:g} at the down projection; PrefixQuant's prefix: "
                                      f"{prefix}.")
    if report.get("domains"):
        out["domain_heads.png"] = (f"{len(report['domains']['switching_heads'])} heads are dormant (D) on one text "
                                   "and active on another.")
    if report.get("context_sweep"):
        sweep = report["context_sweep"]
        forms = ", ".join(f"{m.replace('_', ' ')} at length {sweep[m]['forms_at']}" for m in ("no_bos", "bos")
                          if m in sweep)
        out["context_sweep.png"] = f"The sink forms {forms}."
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, header, rows) for the HTML and Markdown renderings."""
    v = report["verdict"]
    att = report["attention"]
    verdict = [
        ["sink positions", v["sink_positions"]],
        ["sink token ids (content)", [f"{i} {t!r}" for i, t in zip(v["sink_token_ids"], v["sink_tokens"],
                                                                     strict=True)]],
        ["peak channels", v["peak_channels"]],
        ["origin (probe)", v["origin"]],
        ["sink rate eps 0.3 / 0.8 (%)", [att["sink_rate"]["0.3"], att["sink_rate"]["0.8"]]],
        ["sink rate at T=64, eps 0.3 / 0.8 (%)", [att["sink_rate_t64"]["0.3"], att["sink_rate_t64"]["0.8"]]],
        ["peaks appear / vanish at layer", [report["residual"]["appear_layer"], report["residual"]["vanish_layer"]]],
        ["outlier tokens o (PrefixQuant)", v["outlier_token_count"]],
        ["prefix ids", [f"{i} {t!r}" for i, t in zip(v["prefix_ids"], v["prefix_tokens"], strict=True)]],
        ["broken Linear inputs (int8 stretch >= 4)", [f"{b['name']} x{b['int8_stretch']:.3g}"
                                                       for b in v["broken_linears"]]],
        ["systematic outliers by bucket (An et al.)",
         [f"{k}: {n}" for k, n in report["residual"]["systematic_buckets"].items()]],
    ]
    residual = []
    for row in report["residual"]["layers"]:
        tops = [f"{t['value']:.4g} @pos {t['position']} {t['token']!r} ch {t['channel']}" for t in row["top"]]
        residual.append([row["layer"], row["median_abs"], *tops, row["top1_over_median"], row["massive_count"],
                         row["kurtosis"]])
    heads = [[late["layer"], sum(a > 0.3 for a in alpha), sum(a > 0.8 for a in alpha), late["mean"], late["std"],
              min(drain)] for late, alpha, drain in zip(att["first_token_late"], att["alpha0"], att["value_drain"],
                                                        strict=True)]
    linears = sorted(report["linears"].items(), key=lambda e: -(e[1]["int8_stretch"] or 0))[:TABLE_ROWS]
    linear_rows = [[name, r["int8_stretch"], r["inf_norm"], r["kurtosis"], r["int8_outlier_columns"],
                    r["outlier_tokens_per_window"], r["quant_error_share"]["int8_per_tensor"]["top1"],
                    r["quant_error_share"]["int4_per_token"]["top2"]] for name, r in linears]
    hidden = [[h["position"], h["windows"], h["max_column_mean"]] for h in att["hidden_sinks"]]
    outliers = [[t["id"], repr(t["text"]), t["count"], t["seen"]]
                for t in report["token_outliers"]["outlier_token_ids"]]
    result = [
        ("Verdict details", ["what", "value"], verdict),
        ("Residual-state peaks per layer (Sun et al.)",
         ["layer", "median |h|", "top-1", "top-2", "top-3", "top-1 / median", "massive entries",
          "kurtosis (Bondarenko)"], residual),
        ("Attention per layer (Gu et al.; StreamingLLM; Guo et al.)",
         ["layer", "heads alpha_0 > 0.3", "heads alpha_0 > 0.8", "late attn to tok 0", "std over heads",
          "min value drain"], heads),
        (f"Linear inputs, worst {TABLE_ROWS} by int8 stretch (all in report.json)",
         ["Linear input", "int8 stretch", "inf-norm", "kurtosis", "LLM.int8 outlier cols", "outlier tokens/window",
          "int8/tensor err top-1", "int4/token err top-2"], linear_rows),
        ("Hidden sinks beyond token 0 (ACT, column mean > 0.1)", ["position", "windows", "max column mean"], hidden),
        ("Outlier token ids outside position 0 (PrefixQuant)", ["id", "text", "count", "occurrences"], outliers),
    ]
    if report.get("probe"):
        probe = report["probe"]
        rows = [["position 0", p["token_id"], repr(p["token"]), p["peak_ratio"], p["sink"]]
                for p in probe["position_test"]]
        rows += [[f"position {probe['middle_position']}" + (" (control)" if c["control"] else ""), c["token_id"],
                  repr(c["token"]), c["peak_ratio"], c["sink"]] for c in probe["content_test"]]
        bos = probe["bos_test"]
        if bos.get("bos_id") is not None:
            rows.append(["no BOS: first token", "", "", bos["without_bos"]["first_token_peak_ratio"],
                         bos["without_bos"]["first_token_sink"]])
            rows.append(["with BOS: BOS", bos["bos_id"], repr(bos["bos_token"]), bos["with_bos"]["bos_peak_ratio"],
                         bos["with_bos"]["bos_sink"]])
            rows.append(["with BOS: first text token", "", "", bos["with_bos"]["first_text_peak_ratio"],
                         bos["with_bos"]["first_text_sink"]])
        result.append((f"Sink origin probe: {probe['origin']}",
                       ["where", "token id", "token", "max |h| / median", "massive (sink)"], rows))
        per_layer = probe["per_layer"]
        result.append((f"Waiver element per layer (Yan et al.): by position from layer "
                       f"{per_layer['position_from_layer']}, by content from layer {per_layer['content_from_layer']}",
                       ["layers", "sink chosen by"], _runs(per_layer["layers"])))
    result += _paper_tables(report)
    provenance = [["schema", f"{report['schema']} v{report['schema_version']}"],
                  ["model", f"{report['model']['spec']} ({report['model'].get('sha256', '')})"],
                  ["data", f"sha256 {report['data']['sha256']}, calibration windows "
                           f"{report['data']['calib_range']} of ctx {report['ctx']}"],
                  ["BOS", f"policy {report['bos']['policy']}, added: {report['bos']['added']}"],
                  *[[f"version {k}", val] for k, val in sorted(report["versions"].items())],
                  *[[f"source: {k}", val] for k, val in sorted(report["sources"].items())],
                  *[[f"convention: {k}", val] for k, val in sorted(report["conventions"].items())]]
    result.append(("Provenance and metric sources", ["what", "value"], provenance))
    return result


def _runs(values: list[str]) -> list[list[str]]:
    """Consecutive layers with the same answer as one row: [['0..10', 'none'], ['11..27', 'position'], ...]."""
    rows: list[list[str]] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            rows.append([f"{start}..{i - 1}" if i - 1 > start else str(start), values[start]])
            start = i
    return rows


def _paper_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The sections that answer the papers' questions: domains, interventions, context sweep."""
    result = []
    domains = report.get("domains")
    if domains:
        names = domains["texts"]
        result.append(("Texts compared for active and dormant heads (Guo et al.)",
                       ["text", "source", "sha256", "dormant heads", "mean alpha_0"],
                       [[n, domains["data"][n].get("kind", domains["data"][n].get("path", "")),
                         domains["data"][n]["sha256"][:12], len(domains["dormant_heads"][n]),
                         sum(map(sum, domains["alpha0"][n])) / sum(map(len, domains["alpha0"][n]))] for n in names]))
        rows = [[r["layer"], r["head"], r["dormant_on"], r["active_on"], [r["alpha0"][n] for n in names],
                 [r["entropy"][n] for n in names]] for r in domains["switching_heads"][:TABLE_ROWS]]
        result.append((f"Heads dormant on one text and active on another ({len(domains['switching_heads'])}, "
                       f"first {TABLE_ROWS})", ["layer", "head", "dormant on", "active on",
                                                f"alpha_0 ({', '.join(names)})", "row entropy (nat)"], rows))
    intervention = report.get("interventions")
    if intervention and intervention.get("layer") is not None:
        ppl = intervention["perplexity"]
        ratio = intervention["ratio_vs_fp32"]
        result.append((f"Interventions on massive activations (Sun et al.): layer {intervention['layer']} output, "
                       f"channels {intervention['channels']}, {sum(intervention['entries_per_window'])} entries in "
                       f"{len(intervention['windows'])} windows, seed {intervention['seed']}",
                       ["condition", "perplexity", "x fp32"],
                       [["fp32", ppl["fp32"], 1.0], *[[k, ppl[k], ratio[k]] for k in ratio]]))
    elif intervention:
        result.append(("Interventions on massive activations (Sun et al.)", ["note"], [[intervention["note"]]]))
    sweep = report.get("context_sweep")
    if sweep:
        rows = []
        for mode in ("no_bos", "bos"):
            for r in sweep.get(mode, {}).get("rows", []):
                rows.append([mode, r["length"], r["sink_rate"], max(r["first_token_attention"]),
                             max(r["residual_peak"]), r["token0_massive_layers"][:1], r["formed"]])
        forms = ", ".join(f"{m}: {sweep[m]['forms_at']}" for m in ("no_bos", "bos") if m in sweep)
        result.append((f"Sink vs context length (Barbero et al.): forms at length {forms}",
                       ["BOS", "length", "sink rate (%)", "max attn to tok 0", "max tok-0 peak ratio",
                        "first massive layer", "formed"], rows))
    return result


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;line-height:1.4}
nav{font-size:13px;margin:0.5em 0 1em}nav a{margin-right:0.9em}
.advice{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:1.2em}
.advice section{border:1px solid #ccc;border-radius:6px;padding:0.4em 1.2em 0.8em}
#recommendation{background:#f3f8f1;border-color:#8bb37f}
code{display:block;background:#f4f4f4;padding:4px 8px;border-radius:3px;font-size:12.5px;white-space:pre-wrap;
overflow-wrap:anywhere;margin:0.3em 0}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:1.2em;align-items:start}
figure{margin:0;border:1px solid #ddd;padding:0.4em}figure img{width:100%;height:auto;max-height:600px;
object-fit:contain}
figcaption{font-size:13px;color:#444;padding:0.2em 0.3em}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#f0f0f0}"""


def _anchor(text: str) -> str:
    return "t-" + "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The verdict and the recommendation first (a 30-second read), then the plots in a grid, each with its one-line
    reading, then the tables; a table of contents links every section."""
    advice, notes, sections = recommend(report), captions(report), tables(report)
    esc = html.escape
    toc = [("verdict", "Verdict"), ("recommendation", "Recommendation"), ("plots", "Plots"),
           *[(_anchor(title), title) for title, _, _ in sections]]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sinkquant profile: "
             f"{esc(report['model']['spec'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>Sink and outlier profile: {esc(report['model']['spec'])}</h1>",
             "<nav>" + "".join(f"<a href='#{key}'>{esc(title)}</a>" for key, title in toc) + "</nav>",
             "<div class='advice'><section id='verdict'><h2>Verdict</h2><ul>",
             *[f"<li>{esc(line)}</li>" for line in advice["findings"]],
             "</ul></section><section id='recommendation'><h2>Recommendation</h2>",
             f"<p>Start from <b>{esc(advice['recipe'])}</b>:</p><p><code>{esc(advice['command'])}</code></p>",
             f"<p>Expected cost: {esc(advice['cost'])} (<a href='{advice['evidence']}'>{esc(advice['evidence'])}</a>)."
             "</p><p>Why, from this profile:</p><ul>",
             *[f"<li>{esc(reason)}</li>" for reason in advice["reasons"]],
             f"</ul><p>Or search a recipe for this model ({esc(advice['auto_cost'])}):</p>"
             f"<code>{esc(advice['auto_command'])}</code></section></div>",
             "<h2 id='plots'>Plots</h2><div class='plots'>"]
    for name, data in images.items():
        parts.append(f"<figure id='{_anchor(name)}'><img alt='{name}' "
                     f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                     f"<figcaption>{esc(notes.get(name, name))}</figcaption></figure>")
    parts.append("</div>")
    for title, header, rows in sections:
        parts.append(f"<h2 id='{_anchor(title)}'>{esc(title)}</h2><table><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", "\\n")


def render_markdown(report: dict[str, Any], images: dict[str, bytes]) -> str:
    advice, notes = recommend(report), captions(report)
    lines = [f"# Sink and outlier profile: {report['model']['spec']}", "", "## Verdict", ""]
    lines += [f"- {line}" for line in advice["findings"]]
    lines += ["", "## Recommendation", "", f"Start from **{advice['recipe']}**:", "", f"    {advice['command']}", "",
              f"Expected cost: {advice['cost']} ({advice['evidence']}). Why, from this profile:", ""]
    lines += [f"- {reason}" for reason in advice["reasons"]]
    lines += ["", f"Or search a recipe for this model ({advice['auto_cost']}):", "", f"    {advice['auto_command']}",
              "", "## Plots", ""]
    for name in images:
        lines += [f"![{name}](plots/{name})", "", f"*{notes.get(name, name)}*", ""]
    for title, header, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """All files into a temp folder renamed into place, so an interrupted run leaves nothing half-written."""
    images = plots(report)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(to_json(report), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report, images), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(report, images), encoding="utf-8")
        (tmp / "plots").mkdir()
        for name, data in images.items():
            (tmp / "plots" / name).write_bytes(data)
    return Path(out)
