"""A fixed prefix (PrefixQuant / CushionCache) whose KV is computed once by the full-precision model and reused:
the quantized layers never see the sink tokens' peaks, so static per-tensor scales fit ordinary tokens. The
prefix positions are kept in full precision and are never scored. Which tokens: sinkquant.recipes.prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sinkquant.perplexity import build_prefix
from sinkquant.recipes.prefix import select_prefix_ids
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import PrefixConfig, PrefixSpec

if TYPE_CHECKING:
    from sinkquant.engine.session import Session

__all__ = ["PrefixConfig", "PrefixStep"]


@register
class PrefixStep(PrefixSpec, Step):
    def apply(self, session: Session) -> dict[str, Any]:
        loaded, cfg = session.loaded, self.config
        ids, record = select_prefix_ids(loaded, session.calibration, cfg.max_tokens, cfg.bos, cfg.tokens,
                                        session.profile_report, check=cfg.check)
        session.prefix = build_prefix(loaded.model, ids)
        session.keep = session.keep.merged(positions=tuple(range(len(ids))))
        return {**record, "ids": ids, "tokens": [loaded.tokenizer.decode([i]) for i in ids], "bos_mode": cfg.bos}
