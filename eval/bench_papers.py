"""What the sink papers measure, on one model: the profile's paper sections and ACT's effect on fp32 perplexity.

    python eval/bench_papers.py --ctx 512 --windows 4 --threads 1

Profiles `--windows` calibration windows of WikiText-2 against a generated list of numbers (Guo et al.), with
the interventions on massive activations (Sun et al.) and the context sweep 16..2048 with and without BOS
(Barbero et al.), reporting the seconds each section adds; then applies ACT (Yu et al.) with heads chosen on
`--act-calib` calibration windows and evaluates fp32 perplexity on the first `--act-eval` windows."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import benchlib

from sinkquant.data import plan_windows, tokenize
from sinkquant.perplexity import evaluate
from sinkquant.profiling.context import CONTEXT_LENGTHS
from sinkquant.profiling.domains import numbers_text
from sinkquant.profiling.profiler import profile
from sinkquant.quant.scheme import Scheme
from sinkquant.steps.act import ActConfig, ActStep
from sinkquant.steps.session import Session
from sinkquant.tables import markdown_table


def main() -> None:
    parser = benchlib.parser(__doc__, windows=4, out="eval/results/papers")
    parser.add_argument("--act-calib", type=int, default=4, help="calibration windows that choose ACT's heads")
    parser.add_argument("--act-eval", type=int, default=8, help="evaluation windows for ACT's perplexity")
    parser.add_argument("--report", type=Path, default=None, help="also keep the profile report folder here")
    args = parser.parse_args()
    loaded, stream = benchlib.setup(args)
    numbers = tokenize(numbers_text(), loaded.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.report or Path(tmp) / "report"
        report = profile(loaded, {"wikitext": stream, "numbers": numbers}, ctx=args.ctx, windows=args.windows,
                         bos="never", out=out, progress=False, overwrite=args.report is not None,
                         interventions=True, context_lengths=CONTEXT_LENGTHS)
    run = report["run"]
    seconds = {"collection": run["collect_seconds"], **run["section_seconds"],
               "probe, verdict, files": run["seconds"] - run["collect_seconds"] - sum(run["section_seconds"].values())}
    intervention = report["interventions"]
    sweep = report["context_sweep"]
    domains = report["domains"]

    plan = plan_windows(stream, args.ctx, max_windows=args.act_eval, calib_windows=args.act_calib)
    fp32 = evaluate(loaded, stream, plan, bos="never", progress=False)
    act_model = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    calibration = stream.windows(args.ctx, list(plan.calib_windows))
    record = ActStep(ActConfig()).apply(Session(loaded=act_model, scheme=Scheme(), calibration=calibration,
                                                progress=False))
    act = evaluate(act_model, stream, plan, bos="never", progress=False)

    tables = [
        f"## Seconds per section (ctx {args.ctx}, {args.windows} windows; the machine was shared)\n\n"
        + markdown_table(["section", "seconds"], [[k, f"{v:.1f}"] for k, v in seconds.items()]),
        f"## Interventions on massive activations (Sun et al.): layer {intervention['layer']} output, channels "
        f"{intervention['channels']}, entries per window {intervention['entries_per_window']}\n\n"
        + markdown_table(["condition", "perplexity", "x fp32"],
                         [["fp32", f"{intervention['perplexity']['fp32']:.3f}", "1"]]
                         + [[k, f"{intervention['perplexity'][k]:.6g}", f"{v:.6g}"]
                            for k, v in intervention["ratio_vs_fp32"].items()]),
        "## Sink vs context length (Barbero et al.)\n\n" + markdown_table(
            ["BOS", "length", "sink rate %", "max tok-0 peak ratio", "first massive layer", "formed"],
            [[mode, r["length"], f"{r['sink_rate']:.1f}", f"{max(r['residual_peak']):.0f}",
              r["token0_massive_layers"][:1], r["formed"]] for mode in ("no_bos", "bos") for r in sweep[mode]["rows"]])
        + f"\n\nForms at: no BOS {sweep['no_bos']['forms_at']}, BOS {sweep['bos']['forms_at']} tokens.",
        "## Active and dormant heads (Guo et al.): WikiText-2 vs numbers_text() (seed 0)\n\n"
        "Dormant heads: " + ", ".join(f"{n} {len(v)}" for n, v in domains["dormant_heads"].items())
        + f"; {len(domains['switching_heads'])} heads dormant on one text and active on the other. Top 5:\n\n"
        + markdown_table(["layer.head", "dormant on", "alpha_0 wikitext", "alpha_0 numbers"],
                         [[f"L{r['layer']}.H{r['head']}", r["dormant_on"][0], f"{r['alpha0']['wikitext']:.3f}",
                           f"{r['alpha0']['numbers']:.3f}"] for r in domains["switching_heads"][:5]]),
        f"## Waiver element (Yan et al.): by position from layer {report['probe']['per_layer']['position_from_layer']},"
        f" by content from layer {report['probe']['per_layer']['content_from_layer']}",
        f"## ACT (Yu et al.), fp32, ctx {args.ctx}, {args.act_eval} evaluation windows, heads chosen on "
        f"{args.act_calib} calibration windows\n\n" + markdown_table(
            ["model", "perplexity", "vs fp32"],
            [["fp32", f"{fp32.ppl:.3f}", "-"], [f"ACT beta {record['beta']}, {len(record['heads'])} heads",
                                                f"{act.ppl:.3f}", f"{100 * (act.ppl / fp32.ppl - 1):+.2f}%"]]),
    ]
    benchlib.write_result(args.out, "What the sink papers measure (SmolLM2)", "\n\n".join(tables), {
        "seconds": seconds, "interventions": intervention, "context_sweep": sweep,
        "switching_heads": domains["switching_heads"], "dormant_heads": domains["dormant_heads"],
        "domains_data": domains["data"], "waiver": report["probe"]["per_layer"],
        "act": {"record": record, "fp32": fp32.to_dict(), "act": act.to_dict()},
        "data_sha256": stream.text_sha256, "model": report["model"], "seed": report["seed"]})


if __name__ == "__main__":
    main()
