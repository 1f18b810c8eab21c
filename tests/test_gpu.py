"""CUDA twins of the CPU checks whose code takes a device-specific path: the native backend's integer kernels,
GPTQ's Hessians and solve, the native int8 KV cache and a bf16 model, each against the same computation on the
CPU. `make gpu-check` runs them (with the runtime benchmark); without a CUDA device they are skipped."""

from __future__ import annotations

import pytest
import torch

from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.recipe import parse_recipe
from tests.test_native import _layer, _relative, _simulated
from tests.tiny import tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

NATIVE = {"name": "native", "description": "static W8A8, native kernels, int8 KV",
          "steps": [{"prefix": {"tokens": ["\n"]}}, {"smooth": {}}, {"exceptions": {"top": 1}}],
          "scheme": {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}, "kv": {"bits": 8}},
          "backend": "native", "calibration": {"windows": 2}}
GPTQ = {"name": "gptq", "description": "int4 GPTQ", "calibration": {"windows": 2},
        "scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 32, "gptq": {}}}}


def _stream() -> TokenStream:
    return TokenStream(ids=torch.randint(3, 5000, (64 * 8,), generator=torch.Generator().manual_seed(0)),
                       text_sha256="random", source={})


def _quantized_ppl(tokenizer, recipe: dict, device: str, dtype: torch.dtype = torch.float32):
    loaded = tiny_model("llama", tokenizer)
    loaded.model.to(device=device, dtype=dtype)
    stream = _stream()
    quantized = apply_recipe(loaded, parse_recipe(recipe), stream, ctx=64)
    plan = plan_windows(stream, 64, max_windows=2, calib_windows=2)
    return quantized, quantized.evaluate(stream, plan, bos="never", progress=False).ppl


@pytest.mark.parametrize("grid", [(8, "channel", None), (4, "group", 64)], ids=["w8", "w4g64"])
@pytest.mark.parametrize("act", [None, ("static", True), ("dynamic-token", True)], ids=["a16", "static", "token"])
def test_native_layer_on_cuda_matches_simulator(grid, act) -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 128), torch.randn(96), torch.randn(2, 24, 128) * 3
    qweight, spec, scale, zero_point, native = _layer(weight, bias, x, None, grid, True, act)
    reference = _simulated(x, qweight, bias, spec, None, scale, zero_point)
    out = native.to("cuda")(x.cuda())
    assert out.is_cuda and _relative(out.cpu(), reference) < 1e-4


def test_native_recipe_on_cuda_matches_cpu(smollm2) -> None:
    """Prefix, smoothing, exceptions, static int8 activations and the int8 KV cache, all on the GPU."""
    on_gpu, ppl_gpu = _quantized_ppl(smollm2.tokenizer, NATIVE, "cuda")
    _, ppl_cpu = _quantized_ppl(smollm2.tokenizer, NATIVE, "cpu")
    assert {t.device.type for t in on_gpu.model.state_dict().values()} == {"cuda"}
    assert abs(ppl_gpu - ppl_cpu) / ppl_cpu < 1e-3


def test_gptq_on_cuda_matches_cpu(smollm2) -> None:
    gpu, _ = _quantized_ppl(smollm2.tokenizer, GPTQ, "cuda")
    cpu, _ = _quantized_ppl(smollm2.tokenizer, GPTQ, "cpu")
    layers = [(name, m) for name, m in gpu.model.named_modules() if getattr(m, "weight_int", None) is not None]
    assert layers
    cpu_modules = dict(cpu.model.named_modules())
    for name, module in layers:
        same = (module.weight_int.cpu() == cpu_modules[name].weight_int).float().mean()
        assert same > 0.99, name  # float64 Hessians; a rounding tie may land differently


def test_bf16_model_on_cuda_stays_bf16(smollm2) -> None:
    quantized, ppl = _quantized_ppl(smollm2.tokenizer, NATIVE, "cuda", torch.bfloat16)
    norms = {p.dtype for n, p in quantized.model.named_parameters() if "norm" in n}
    assert norms == {torch.bfloat16} and torch.isfinite(torch.tensor(ppl))
