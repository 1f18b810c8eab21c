"""The answer a recipe needs from a profile: which positions and token ids are sinks, which channels hold their
peaks, which Linear inputs they break, and the PrefixQuant prefix to put in front of every sequence."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sinkquant.profiling import metrics

# A per-tensor int8 scale stretched 4x by the sinks loses 2 of its 8 bits on every other token.
BREAK_STRETCH = 4.0
MAJORITY_SINK_RATE = 50.0


@dataclass(frozen=True)
class Verdict:
    """Consumed by the recipes layer as `report["verdict"]`."""

    sink_positions: list[int]
    sink_token_ids: list[int]
    sink_tokens: list[str]
    peak_channels: list[int]
    broken_linears: list[dict[str, Any]]
    outlier_token_count: int
    prefix_ids: list[int]
    prefix_tokens: list[str]
    origin: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_verdict(summary: dict[str, Any], outlier_ids: Counter[int], windows: int, bos_id: int | None,
                  probe: dict[str, Any] | None, decode: Callable[[int], str]) -> Verdict:
    """Sink positions: massive in at least half the windows, plus 0 when most heads put > 0.3 on it (Gu et al.).
    Sink ids: ids massive outside position 0 in at least half as many occurrences as windows, plus ids the
    probe showed to become sinks wherever they stand. Prefix: PrefixQuant's rule (metrics.md item 2)."""
    residual = summary["residual"]
    positions = {p["position"] for p in residual["massive_positions"] if 2 * p["windows"] >= windows}
    if summary["attention"]["sink_rate"][str(metrics.SINK_EPS[0])] >= MAJORITY_SINK_RATE:
        positions.add(0)
    ids = [t["id"] for t in residual["massive_token_ids"] if 2 * t["count"] >= windows]
    ids += [i for i in (probe or {}).get("content_sink_ids", []) if i not in ids]
    counts = residual["massive_channels"]
    channels = [c["channel"] for c in counts if counts and 10 * c["count"] >= counts[0]["count"]][:3]
    broken = sorted(
        ({"name": name, "int8_stretch": row["int8_stretch"]} for name, row in summary["linears"].items()
         if row["int8_stretch"] is not None and row["int8_stretch"] >= BREAK_STRETCH),
        key=lambda r: (-r["int8_stretch"], r["name"]),
    )
    o = summary["token_outliers"]["o"]
    prefix = metrics.prefix_ids(outlier_ids, o, bos_id)
    return Verdict(
        sink_positions=sorted(positions), sink_token_ids=ids, sink_tokens=[decode(i) for i in ids],
        peak_channels=channels, broken_linears=broken, outlier_token_count=o, prefix_ids=prefix,
        prefix_tokens=[decode(i) for i in prefix], origin=(probe or {}).get("origin", "not probed"),
    )
