"""Noise floor of the perplexity regression baselines: the spread of each recipe's perplexity between the CPU kernel
paths this machine runs, against the number of scored tokens.

    python eval/bench_regression_noise.py                       # the shipped baselines, as last measured
    python eval/bench_regression_noise.py --measure 256x8 512x4  # also measure these ctx x windows settings

Every baseline measured by `sinkquant check --update-baselines` records each kernel path's NLL per evaluation
window (each path in its own process, `ATEN_CPU_CAPABILITY`), so the spread after the first n windows is read off
it. Quantized perplexity moves with kernel rounding (fp32 barely does) and the spread shrinks as tokens add up;
the shipped baselines' ctx/windows and rel_tol are chosen from this table so that K_SPREAD x spread < rel_tol."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import benchlib

from sinkquant.regression import K_SPREAD, read_baseline, update_baseline
from sinkquant.tables import markdown_table

BASELINES = sorted((benchlib.REPO / "eval" / "baselines").glob("*.json"))


def measured_copies(settings: list[str], folder: Path) -> list[Path]:
    """Each shipped baseline at each ctx x windows setting, measured on every kernel path."""
    paths = []
    for setting in settings:
        ctx, windows = (int(v) for v in setting.split("x"))
        for source in BASELINES:
            spec = json.loads(source.read_text())
            spec.update(ctx=ctx, windows=windows, recipe=str((source.parent / spec["recipe"]).resolve()), kernels={})
            path = folder / f"{source.stem}@{setting}.json"
            path.write_text(json.dumps(spec))
            print(update_baseline(path).message, flush=True)
            paths.append(path)
    return paths


def rows(path: Path) -> list[dict]:
    """Spread between kernel paths after the first 1, 2, 4, ... windows of one measured baseline."""
    spec = read_baseline(path)
    kernels = sorted(spec.kernels)
    out = []
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n < spec.windows] + [spec.windows]
    for n in counts:
        ppls = {k: math.exp(sum(spec.kernels[k].nll[:n]) / (n * (spec.ctx - 1))) for k in kernels}
        mean = sum(ppls.values()) / len(ppls)
        out.append({"recipe": path.stem.split("@")[0], "ctx": spec.ctx, "windows": n, "tokens": n * (spec.ctx - 1),
                    "ppl": ppls, "spread": (max(ppls.values()) - min(ppls.values())) / mean, "rel_tol": spec.rel_tol,
                    "shipped": n == spec.windows and "@" not in path.stem})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="*", default=[], metavar="CTXxWINDOWS",
                        help="also measure the shipped recipes at these settings (each kernel path, one process each)")
    parser.add_argument("--out", type=Path, default=benchlib.REPO / "eval/results/regression_noise")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [r for path in [*BASELINES, *measured_copies(args.measure, Path(folder))] for r in rows(path)]
    if any(len(r["ppl"]) < 2 for r in results):
        raise SystemExit("a baseline has fewer than two kernel paths: measure it on a CPU with AVX512 "
                         "(`sinkquant check --update-baselines eval/baselines/*.json`)")
    kernels = sorted(results[0]["ppl"])
    table = [[r["recipe"], r["ctx"], r["windows"], r["tokens"], *(f"{r['ppl'][k]:.3f}" for k in kernels),
              f"{100 * r['spread']:.2f}%", f"{100 * K_SPREAD * r['spread']:.2f}%",
              f"{100 * r['rel_tol']:.0f}%" + (" (shipped)" if r["shipped"] else "")] for r in results]
    body = ("Model smollm2-135m, WikiText-2 test, BOS never, calibration windows from the end of the text, evaluation "
            "windows from its start; each kernel path in its own process. Spread = (max - min) / mean over kernel "
            f"paths after the first n windows; a baseline's tolerance is max(rel_tol, {K_SPREAD:g} x spread of all "
            "its windows). 'shipped' marks the setting a shipped baseline checks.\n\n"
            + markdown_table(["recipe", "ctx", "windows", "scored tokens", *(f"ppl {k}" for k in kernels), "spread",
                              f"{K_SPREAD:g} x spread", "rel_tol"], table))
    benchlib.write_result(args.out, "Regression noise floor: perplexity spread between CPU kernel paths", body,
                          {"kernels": kernels, "rows": results})


if __name__ == "__main__":
    main()
