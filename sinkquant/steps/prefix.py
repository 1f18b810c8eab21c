"""A fixed prefix (PrefixQuant / CushionCache) whose KV is computed once by the full-precision model and reused:
the quantized layers never see the sink tokens' peaks, so static per-tensor scales fit ordinary tokens. The
prefix positions are kept in full precision and are never scored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sinkquant.data import TokenStream
from sinkquant.engine.session import Session
from sinkquant.perplexity import build_prefix
from sinkquant.recipes.prefix import greedy_prefix, token_id, with_bos
from sinkquant.steps.base import Stage, Step, StepConfig, register

GREEDY_SAMPLE_TOKENS = 128
# Prefix selection profiles only a few calibration windows: the PrefixQuant rule is stable on SmolLM2 from 2 on.
PROFILE_WINDOWS = 2


class PrefixConfig(StepConfig):
    tokens: Literal["profile", "greedy"] | list[int | str] = "profile"
    max_tokens: int = Field(default=4, ge=1, le=32)
    bos: Literal["auto", "always", "never"] = "auto"


@register
class PrefixStep(Step):
    name = "prefix"
    Config = PrefixConfig
    stage = Stage.TRANSFORM

    def apply(self, session: Session) -> dict[str, Any]:
        loaded, cfg = session.loaded, self.config
        ids, record = self._select(session)
        session.prefix = build_prefix(loaded.model, ids)
        session.keep = session.keep.merged(positions=tuple(range(len(ids))))
        return {**record, "ids": ids, "tokens": [loaded.tokenizer.decode([i]) for i in ids], "bos": cfg.bos}

    def _select(self, session: Session) -> tuple[list[int], dict[str, Any]]:
        loaded, cfg, windows = session.loaded, self.config, session.calibration
        if isinstance(cfg.tokens, list):
            ids = [token_id(loaded, t, f"prefix.tokens[{i}]") for i, t in enumerate(cfg.tokens)]
            return with_bos(loaded, ids, cfg.bos)[: cfg.max_tokens], {"source": "recipe"}
        head = with_bos(loaded, [], cfg.bos)
        if len(head) >= cfg.max_tokens:  # BOS alone fills the prefix: no ranking can change it
            return head[: cfg.max_tokens], {"source": "bos"}
        if cfg.tokens == "greedy":
            ids, trace = greedy_prefix(loaded, windows[:2, :GREEDY_SAMPLE_TOKENS], cfg.max_tokens, cfg.bos)
            return ids, {"source": "greedy", "trace": trace}
        report = session.profile_report
        if report is None:
            from sinkquant.profiling import profile

            sample = windows[:PROFILE_WINDOWS]
            stream = TokenStream(ids=sample.reshape(-1), text_sha256="calibration windows",
                                 source={"kind": "calibration"})
            report = profile(loaded, stream, ctx=sample.shape[1], windows=sample.shape[0], bos="never",
                             progress=False, probe=False)
        verdict = report["verdict"]
        ids = with_bos(loaded, verdict["prefix_ids"], cfg.bos)[: cfg.max_tokens]
        return ids, {"source": "profile", "verdict_prefix": verdict["prefix_ids"]}
