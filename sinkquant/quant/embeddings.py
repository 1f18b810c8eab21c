"""The token embedding and lm_head (tied or not) in the precision the artifact stores them: a 16-bit float, or
int8 with one scale per row (per token for the embedding, per output channel for lm_head). Rows are independent
lookups, so a per-row grid costs almost nothing; the in-memory weights are rounded to what is stored, so the
evaluated perplexity is the artifact's."""

from __future__ import annotations

import torch
from torch import nn

from sinkquant.errors import SinkquantError
from sinkquant.quant.qweight import QuantizedWeight, quantize_rtn


def embedding_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """'<module>.weight' -> weight of the input and output embeddings, a tied weight once (input's name)."""
    names = {id(m): n for n, m in model.named_modules()}
    weights: dict[str, nn.Parameter] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and all(w is not module.weight for w in weights.values()):
            weights[f"{names[id(module)]}.weight"] = module.weight
    return weights


def int8_rows(weight: torch.Tensor) -> QuantizedWeight:
    return quantize_rtn(weight, 8, "channel", None, symmetric=True)


@torch.no_grad()
def round_embeddings(model: nn.Module, dtype: str) -> None:
    """Round the embedding weights in place (kept float32 in memory) to what `stored` writes."""
    for weight in embedding_weights(model).values():
        rounded = int8_rows(weight).dequantize(weight.dtype) if dtype == "int8" else weight.to(getattr(torch, dtype))
        weight.copy_(rounded)


def stored(name: str, weight: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors an artifact holds for the embedding weight `name`: int8 values and row scales, or 16-bit."""
    if dtype == "int8":
        q = int8_rows(weight)
        return {f"{name}_int8": q.qweight.contiguous().cpu(), f"{name}_scale": q.scale.contiguous().cpu()}
    return {name: weight.to(getattr(torch, dtype)).contiguous().cpu()}


def restore(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: str) -> None:
    """Turn an int8 embedding's values and scales in `tensors` back into the float weight `name`, in place."""
    if f"{name}_int8" not in tensors:
        return
    values, scale = tensors.pop(f"{name}_int8"), tensors.pop(f"{name}_scale", None)
    if scale is None or tuple(values.shape) != shape or tuple(scale.shape) != (shape[0], 1):
        raise SinkquantError(f"{source}: the int8 embedding {name} or its scale is missing or has the wrong shape "
                             f"(expected {shape} and {(shape[0], 1)})")
    tensors[name] = QuantizedWeight(values, scale, torch.zeros_like(scale), 8, "channel", None, True).dequantize()
