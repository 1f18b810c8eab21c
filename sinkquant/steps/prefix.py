"""A fixed prefix (PrefixQuant / CushionCache) whose KV is computed once by the full-precision model and reused:
the quantized layers never see the sink tokens' peaks, so static per-tensor scales fit ordinary tokens. The
prefix positions are kept in full precision and are never scored. Which tokens: sinkquant.recipes.prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from sinkquant.perplexity import build_prefix
from sinkquant.recipes.prefix import select_prefix_ids
from sinkquant.steps.base import Stage, Step, StepConfig, register

if TYPE_CHECKING:
    from sinkquant.engine.session import Session


class PrefixConfig(StepConfig):
    tokens: Literal["profile", "greedy"] | list[int | str] = "profile"
    max_tokens: int = Field(default=4, ge=1, le=32)
    bos: Literal["auto", "always", "never"] = "auto"
    # Measure an explicit list's effect on the fp calibration loss (recorded, never dropped): four fp forwards.
    # Automatic choices are always checked, since the check is what decides them.
    check: bool = True

    @model_validator(mode="after")
    def _explicit_unchecked(self) -> PrefixConfig:
        if not self.check and isinstance(self.tokens, str):
            raise ValueError(f"check: false needs an explicit tokens list; tokens {self.tokens!r} are chosen by the "
                             "check itself")
        return self


@register
class PrefixStep(Step):
    name = "prefix"
    Config = PrefixConfig
    stage = Stage.TRANSFORM

    def apply(self, session: Session) -> dict[str, Any]:
        loaded, cfg = session.loaded, self.config
        ids, record = select_prefix_ids(loaded, session.calibration, cfg.max_tokens, cfg.bos, cfg.tokens,
                                        session.profile_report, check=cfg.check)
        session.prefix = build_prefix(loaded.model, ids)
        session.keep = session.keep.merged(positions=tuple(range(len(ids))))
        return {**record, "ids": ids, "tokens": [loaded.tokenizer.decode([i]) for i in ids], "bos_mode": cfg.bos}
