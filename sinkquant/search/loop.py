"""`--recipe auto`: the profile proposes candidates, a search on calibration windows only chooses the recipe.
Naive scheme first, then each stage of `STAGES` in order against the best so far (sinkquant.search.stages); the
trace records every candidate and each stage's ablation, the chosen recipe is a normal YAML recipe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sinkquant.data import TokenStream, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.io import atomic_write_json, atomic_write_text
from sinkquant.models import LoadedModel
from sinkquant.profiling.verdict import Verdict
from sinkquant.recipe import Recipe
from sinkquant.search.config import SearchConfig
from sinkquant.search.objective import OBJECTIVE, Objective
from sinkquant.search.stages import STAGES, SearchStage
from sinkquant.search.state import Search, make_recipe
from sinkquant.steps.prefix import calibration_profile


def _ablation(stage: str, before: float, after: float) -> dict[str, Any]:
    return {"step": stage, "before": before, "after": after, "kept": after < before}


def run_stage(stage: SearchStage, search: Search, ablation: list[dict[str, Any]]) -> None:
    """One stage against the best so far, listed in `ablation` (a skipped one with why, so it lists every stage
    that applies, in order)."""
    if not stage.applies(search):
        return
    before = search.chosen.objective
    reason = stage.skipped(search)
    if reason is not None:
        ablation.append({**_ablation(stage.name, before, before), "reason": reason})
        return
    stage.run(search)
    ablation.append(_ablation(stage.name, before, search.chosen.objective))


def search_recipe(loaded: LoadedModel, stream: TokenStream, config: SearchConfig | None = None
                  ) -> tuple[Recipe, dict[str, Any]]:
    """Search a recipe for `loaded` on the calibration windows of `stream` only; returns it with the trace of
    what was tried. The loaded model is left untouched (every candidate works on a copy). Only candidates that
    `config.target` runs are tried, and the chosen recipe names that target's backend."""
    config = config or SearchConfig()
    ctx, runtime = config.ctx, config.runtime
    start = time.perf_counter()
    torch.manual_seed(0)
    region = list(plan_windows(stream, ctx, max_windows=1, calib_windows=config.calib_windows).calib_windows)
    objective = Objective(loaded, stream.windows(ctx, region[: config.score_windows]))
    search_ids = region[-config.search_windows:]
    report = calibration_profile(loaded, stream.windows(ctx, search_ids))  # one profile serves every candidate
    search = Search(loaded, stream, config.base, ctx, config.search_windows, objective, report, config.progress,
                    refuse=lambda recipe: runtime.refusals(recipe, loaded.model), budget=config.budget,
                    max_exceptions=config.max_exceptions)
    ablation: list[dict[str, Any]] = []
    try:
        search.calibrated("naive", [])
        naive = search.chosen.objective
        for stage in STAGES:
            run_stage(stage, search, ablation)
    finally:
        search.bar.close()

    best = search.chosen
    kept = [s["step"] for s in ablation if s["kept"]] or ["none"]
    recipe = make_recipe(f"auto-{config.scheme}", f"Searched by --recipe auto for {loaded.spec} on calibration "
                         f"data (kept: {', '.join(kept)}); see the trace beside this file.", search.recipe_steps(),
                         best.scheme, config.final_windows, ctx, backend=runtime.backend)
    verdict = Verdict.of(report)
    trace = {
        "scheme": config.scheme, "target": config.target, "model": loaded.spec, "data_sha256": stream.text_sha256,
        "ctx": ctx, "budget": config.budget, "max_exceptions": config.max_exceptions, "objective": OBJECTIVE,
        "windows": {"score": region[: config.score_windows], "search_calibration": search_ids,
                    "final_calibration": region[config.score_windows:]},
        "verdict": {k: getattr(verdict, k) for k in ("prefix_ids", "prefix_tokens", "sink_positions")},
        "naive_objective": naive, "chosen_objective": best.objective, "budget_met": best.objective <= config.budget,
        "ablation": ablation, "candidates": search.candidates, "recipe": recipe.resolved(),
        "seconds": time.perf_counter() - start,
    }
    return recipe, trace


def write_auto_recipe(recipe: Recipe, trace: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """The recipe as a normal YAML file (`load_recipe` reads it) and the trace beside it as `<stem>.trace.json`,
    both atomically: applying the file reproduces the result without searching again."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise SinkquantError(f"auto recipe path {path} must end in .yaml or .yml (the trace goes beside it)")
    trace_path = path.with_name(f"{path.stem}.trace.json")
    atomic_write_text(path, yaml.safe_dump(recipe.resolved(), sort_keys=False))
    atomic_write_json(trace_path, trace)
    return path, trace_path
