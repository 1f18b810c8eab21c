"""Devices and dtypes: every tensor the engine makes lives on the model's device in the model's dtype family;
GPU checks carry the `gpu` marker and are skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.recipe import parse_recipe
from tests.tiny import tiny_model

RECIPE = {"name": "placement", "description": "every step that makes tensors",
          "steps": [{"prefix": {"tokens": ["\n"]}}, {"smooth": {}}, {"keep_sink": {}}, {"exceptions": {"top": 1}},
                    {"clip": {"grid": 4, "samples": 32}}],
          "scheme": {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}, "kv": {"bits": 8}},
          "calibration": {"windows": 2}}


def _run(tokenizer, device: str, dtype: torch.dtype) -> tuple[object, float]:
    loaded = tiny_model("llama", tokenizer)
    loaded.model.to(device=device, dtype=dtype)
    stream = TokenStream(ids=torch.randint(3, 5000, (64 * 8,), generator=torch.Generator().manual_seed(0)),
                         text_sha256="random", source={})
    quantized = apply_recipe(loaded, parse_recipe(RECIPE), stream, ctx=64)
    plan = plan_windows(stream, 64, max_windows=2, calib_windows=2)
    return quantized, quantized.evaluate(stream, plan, bos="never", progress=False).ppl


def _devices(quantized) -> set[str]:
    places = {t.device.type for t in quantized.model.state_dict().values()}
    for layer in quantized.prefix.cache.layers:
        places |= {layer.keys.device.type, layer.values.device.type}
    return places


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_placement_and_dtypes(smollm2, dtype) -> None:
    quantized, ppl = _run(smollm2.tokenizer, "cpu", dtype)
    assert _devices(quantized) == {"cpu"}
    assert torch.isfinite(torch.tensor(ppl))
    norms = [p.dtype for n, p in quantized.model.named_parameters() if "norm" in n]
    assert set(norms) == {dtype}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_placement(smollm2) -> None:
    quantized, ppl = _run(smollm2.tokenizer, "cuda", torch.float32)
    assert _devices(quantized) == {"cuda"}
    assert torch.isfinite(torch.tensor(ppl))
