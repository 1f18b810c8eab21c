"""Every real CPU backend on the real SmolLM2: quantize, score, save, reload, same perplexity; lm_head and
the tied embedding stay in full precision. CPU int8 kernels are slow, so one 128-token window is scored."""

from __future__ import annotations

import pytest
import torch

from sinkquant.backends.peers import load_backend, quantize_backend, save_backend
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(eval_and_calib):
    return eval_and_calib(128, 1, 1)


# bnb-nf4 is saved before its first forward pass (bitsandbytes issue 2078), then scored after reload.
@pytest.mark.parametrize(
    ("backend", "quantized_type", "tolerance"),
    [
        ("bnb-int8", "Linear8bitLt", 0.10),
        ("bnb-nf4", "Linear4bit", 0.50),
        ("quanto-w8a8", "QLinear", None),
        ("torchao-int8wo", "Linear", 0.10),
        ("torchao-int8dyn", "Linear", 0.10),
    ],
)
def test_backend_save_reload_same_perplexity(
    backend: str, quantized_type: str, tolerance: float | None, smollm2, wikitext_stream, setup, tmp_path
) -> None:
    plan, calib, fp = setup
    model = quantize_backend(smollm2.model, backend, calib_batches=calib)
    folder = save_backend(model, backend, tmp_path / backend)
    before = evaluate(smollm2, wikitext_stream, plan, bos="never", model=model, progress=False).ppl
    reloaded = load_backend(folder)
    after = evaluate(smollm2, wikitext_stream, plan, bos="never", model=reloaded, progress=False).ppl
    assert after == pytest.approx(before, rel=1e-4)
    assert before != fp
    if tolerance is not None:
        assert abs(before - fp) / fp < tolerance
    down = reloaded.get_submodule("model.layers.0.mlp.down_proj")
    assert type(down).__name__ == quantized_type
    if backend.startswith("torchao"):
        assert "Int8" in type(down.weight).__name__
    assert type(reloaded.lm_head) is torch.nn.Linear
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.lm_head.weight, smollm2.model.lm_head.weight)


def test_backend_errors(smollm2, tmp_path) -> None:
    with pytest.raises(SinkquantError, match="backend='gptq' is not valid; valid: bnb-int8"):
        quantize_backend(smollm2.model, "gptq")
    with pytest.raises(SinkquantError, match="quanto-w8a8' needs calib_batches"):
        quantize_backend(smollm2.model, "quanto-w8a8")
    with pytest.raises(SinkquantError, match="has no sinkquant_backend.json"):
        load_backend(tmp_path)
