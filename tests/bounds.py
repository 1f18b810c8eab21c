"""How far two implementations of the same quantized math may differ in perplexity when activations are rounded.

A value within float rounding of a grid boundary may land one level apart, and a model far from fp32 amplifies
that. The float32-vs-float64 perplexity of one of them samples that amplification once; on a second CPU (AVX512-VNNI,
no AMX) the native-vs-simulated gap at ctx 128 over 2 windows reached 4.5x that sample (w8a8-keep-sink: 95.5 against
74.6, float64 spread 6.2%) and 1.1% where the sample read 0.06%. So the bound is 5 samples, at least 0.5% each.
A real fault (a lost prefix or kept row, a wrong scale) moves these perplexities by tens of percent or more."""

ROUNDING_SAMPLES = 5
MIN_SPREAD = 5e-3


def rounding_bound(base: float, ppl: float, ppl64: float) -> float:
    """`base` plus ROUNDING_SAMPLES times the float32-vs-float64 spread (ppl vs ppl64), at least MIN_SPREAD."""
    return base + ROUNDING_SAMPLES * max(abs(ppl64 / ppl - 1), MIN_SPREAD)
