"""Streaming quantization (engine/stream.py): a model written as sharded safetensors, like a hub checkpoint, is
quantized one decoder layer at a time from disk, and the artifact equals the in-memory one bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sinkquant.data import plan_windows
from sinkquant.engine.apply import apply_recipe
from sinkquant.engine.artifact import WEIGHTS_INDEX, load, read_artifact_weights, save
from sinkquant.engine.stream import evaluate_streaming, quantize_streaming
from sinkquant.errors import SinkquantError
from sinkquant.models import load_model
from sinkquant.perplexity import evaluate
from sinkquant.recipe import parse_recipe
from tests.tiny import tiny_model

CTX = 64
# The shipped static W8A8 recipe's steps (exceptions scaled to a 2-layer model's 14 Linears) and GPTQ W4A16.
RECIPES = {
    "static": {"name": "w8a8-prefix-smooth-except", "description": "static", "calibration": {"windows": 2},
               "steps": [{"prefix": {"tokens": "profile", "max_tokens": 2}}, {"smooth": {"alpha": 0.5}},
                         {"exceptions": {"top": 2}}],
               "scheme": {"weights": {"bits": 8, "granularity": "channel"},
                          "activations": {"bits": 8, "mode": "static", "observer": "absmax"}}},
    "gptq": {"name": "w4a16-gptq", "description": "gptq", "calibration": {"windows": 2},
             "scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 32, "gptq": {}}}},
}


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def sharded_checkpoint(arch: str, tokenizer, folder: Path) -> Path:
    """A tiny model saved as several safetensors shards with their index, as hub checkpoints are."""
    loaded = tiny_model(arch, tokenizer)
    loaded.model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    assert (folder / WEIGHTS_INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _record(path: Path) -> dict:
    """The manifest's record without timings and the streaming record."""
    record = json.loads((path / "sinkquant.json").read_text())["record"]
    record.pop("seconds"), record.pop("stream", None)
    for step in record["steps"]:
        step.pop("seconds")
    return record


def _same(a, b) -> bool:
    """Records equal, floats to 1e-6 relative or 1e-5 nats: the prefix check's NLLs (about 10 nats per token)
    come from lm_head left on disk when streaming, its log-partition summed over vocabulary slices
    (quant/stream.py), so they and their differences may differ in the last bits; every choice made from them is
    compared exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-5)
    return a == b


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_streaming_artifact_equals_in_memory(arch: str, recipe: str, tokenizer, wikitext_stream, tmp_path) -> None:
    torch.set_num_threads(1)
    checkpoint = sharded_checkpoint(arch, tokenizer, tmp_path / "checkpoint")
    parsed = parse_recipe(RECIPES[recipe], recipe)
    save(apply_recipe(load_model(str(checkpoint)), parsed, wikitext_stream, ctx=CTX), tmp_path / "memory")
    streamed = quantize_streaming(checkpoint, parsed, wikitext_stream, ctx=CTX, out=tmp_path / "stream")

    memory, stream = read_artifact_weights(tmp_path / "memory"), read_artifact_weights(tmp_path / "stream")
    assert memory.keys() == stream.keys()
    for name, tensor in memory.items():
        assert tensor.dtype == stream[name].dtype and torch.equal(tensor, stream[name]), name
    assert _same(_record(tmp_path / "memory"), _record(tmp_path / "stream"))
    # one shard per decoder layer, one for the rest, one per embedding weight (left on disk while streaming)
    shards = streamed.model.config.num_hidden_layers + 1 + (1 if streamed.model.config.tie_word_embeddings else 2)
    assert streamed.record["stream"]["shards"] == shards
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) == shards
    assert streamed.model.get_input_embeddings().weight.untyped_storage().nbytes() <= 4  # never read whole

    ids = wikitext_stream.windows(CTX, [0])
    reloaded = [load(tmp_path / name) for name in ("memory", "stream")]
    with torch.no_grad():
        logits = [q.model(input_ids=ids, past_key_values=q.cache_for_batch(1)).logits for q in reloaded]
    assert torch.equal(logits[0], logits[1])


def test_streaming_refuses_what_it_cannot_stream(tokenizer, wikitext_stream, tmp_path) -> None:
    checkpoint = sharded_checkpoint("llama", tokenizer, tmp_path / "checkpoint")
    rotate = parse_recipe({"name": "r", "description": "r", "steps": [{"rotate": {}}],
                           "scheme": {"weights": {"bits": 8, "granularity": "channel"}}}, "r")
    with pytest.raises(SinkquantError, match="step 'rotate'"):
        quantize_streaming(checkpoint, rotate, wikitext_stream, ctx=CTX, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SinkquantError, match="not a folder"):
        quantize_streaming(tmp_path / "missing", parse_recipe(RECIPES["gptq"], "g"), wikitext_stream, ctx=CTX,
                           out=tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_perplexity_equals_in_memory(dtype: torch.dtype, tokenizer, wikitext_stream, tmp_path) -> None:
    """The fp (and bf16) reference of a model larger than memory, one decoder layer read at a time per forward."""
    torch.set_num_threads(1)
    loaded = tiny_model("llama", tokenizer)
    loaded.model.to(dtype).save_pretrained(tmp_path, max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path)
    plan = plan_windows(wikitext_stream, CTX, max_windows=3)
    memory = evaluate(load_model(str(tmp_path), dtype=dtype), wikitext_stream, plan, bos="never", progress=False)
    streamed = evaluate_streaming(tmp_path, wikitext_stream, plan, bos="never", dtype=dtype)
    assert streamed.nll_sum == memory.nll_sum and streamed.tokens == memory.tokens == 3 * (CTX - 1)
    assert streamed.model == memory.model


def test_bf16_checkpoint_stays_bf16_and_quantizes(tokenizer, wikitext_stream, tmp_path) -> None:
    """A bf16 checkpoint streams in bf16 (no fp32 copy of a layer), scales in fp32, and equals the in-memory bf16
    artifact."""
    torch.set_num_threads(1)
    loaded = tiny_model("qwen2", tokenizer)
    loaded.model.to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    parsed = parse_recipe(RECIPES["static"], "static")
    streamed = quantize_streaming(tmp_path / "checkpoint", parsed, wikitext_stream, ctx=CTX, out=tmp_path / "stream",
                                  dtype=torch.bfloat16)
    assert streamed.model.get_input_embeddings().weight.dtype == torch.bfloat16
    memory = apply_recipe(load_model(str(tmp_path / "checkpoint"), dtype=torch.bfloat16), parsed, wikitext_stream,
                          ctx=CTX)
    save(memory, tmp_path / "memory")
    a, b = read_artifact_weights(tmp_path / "memory"), read_artifact_weights(tmp_path / "stream")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert b["model.layers.0.self_attn.q_proj.weight_int"].dtype == torch.int8
    assert b["model.layers.0.self_attn.q_proj.act_scale"].dtype == torch.float32
    assert b["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_artifact_perplexity_equals_in_memory(arch: str, tokenizer, wikitext_stream, tmp_path) -> None:
    """`load(stream=True)` reads each decoder layer's integers per forward: the quantized perplexity of an
    artifact larger than memory, equal to the in-memory reload's."""
    torch.set_num_threads(1)
    checkpoint = sharded_checkpoint(arch, tokenizer, tmp_path / "checkpoint")
    quantize_streaming(checkpoint, parse_recipe(RECIPES["static"], "static"), wikitext_stream, ctx=CTX,
                       out=tmp_path / "artifact")
    plan = plan_windows(wikitext_stream, CTX, max_windows=2)
    memory = load(tmp_path / "artifact").evaluate(wikitext_stream, plan, bos="never", progress=False)
    streamed = load(tmp_path / "artifact", stream=True)
    assert {p.device.type for p in streamed.base.adapter.decoder_layers(streamed.model).parameters()} == {"meta"}
    assert "model.embed_tokens.weight" in streamed.layers.embeddings  # read per lookup, never whole
    result = streamed.evaluate(wikitext_stream, plan, bos="never", progress=False)
    # lm_head read from disk a vocabulary slice at a time: the same logits, the log-partition summed per slice
    assert math.isclose(result.nll_sum, memory.nll_sum, rel_tol=1e-6) and result.tokens == memory.tokens
    assert streamed.layers.reads == 2 * streamed.model.config.num_hidden_layers  # once per window and layer


@pytest.mark.parametrize("recipe", ["smooth-except", "gptq"])
def test_bf16_embeddings_with_fp32_layers(recipe: str, tokenizer, wikitext_stream, tmp_path) -> None:
    """A bf16 checkpoint streamed with fp32 layers and bf16 embeddings/lm_head: the layers see exactly what the
    fp32 in-memory model gives them, so every layer tensor equals its artifact's, and the embeddings are stored
    bf16 with the same values."""
    torch.set_num_threads(1)
    loaded = tiny_model("llama", tokenizer)
    loaded.model.to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    raw = dict(RECIPES["gptq" if recipe == "gptq" else "static"])
    raw["steps"] = [] if recipe == "gptq" else raw["steps"][1:]  # lm_head (bf16 here) plays no part
    parsed = parse_recipe(raw, recipe)
    quantize_streaming(tmp_path / "checkpoint", parsed, wikitext_stream, ctx=CTX, out=tmp_path / "stream",
                       dtype=torch.float32, embeddings_dtype=torch.bfloat16)
    save(apply_recipe(load_model(str(tmp_path / "checkpoint")), parsed, wikitext_stream, ctx=CTX), tmp_path / "mem")
    memory, stream = read_artifact_weights(tmp_path / "mem"), read_artifact_weights(tmp_path / "stream")
    assert memory.keys() == stream.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, stream[name].to(tensor.dtype)), name
        embedding = "embed_tokens" in name or name == "lm_head.weight"
        assert stream[name].dtype == (torch.bfloat16 if embedding else tensor.dtype), name


@pytest.mark.long
def test_cli_streams_when_asked_or_when_the_model_would_not_fit(tokenizer, wikitext_path, tmp_path, capsys) -> None:
    """`sinkquant quantize --stream always` writes the sharded artifact and evaluates it streamed; `auto` streams
    only a model that would not fit; --recipe auto refuses to stream."""
    from sinkquant.cli import main
    from sinkquant.engine.stream import IN_MEMORY_PEAK, checkpoint_bytes, streaming_decision

    checkpoint = sharded_checkpoint("llama", tokenizer, tmp_path / "checkpoint")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(RECIPES["gptq"]))
    code = main(["quantize", "--quiet", "--recipe", str(recipe), "--model", str(checkpoint), "--data",
                 str(wikitext_path), "--ctx", str(CTX), "--max-windows", "1", "--stream", "always",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "(streamed)" in out and "--stream always" in out
    assert (tmp_path / "out" / WEIGHTS_INDEX).is_file() and load(tmp_path / "out").record["stream"]["shards"] == 5
    # 5: two decoder layers, the rest, the (untied) embeddings and lm_head

    parsed = parse_recipe(RECIPES["gptq"], "g")
    need = IN_MEMORY_PEAK * checkpoint_bytes(checkpoint, torch.float32)
    assert streaming_decision(str(checkpoint), parsed, torch.float32) is None  # a tiny model fits
    assert "GB are available" in streaming_decision(str(checkpoint), parsed, torch.float32, available=int(need / 2))
    assert streaming_decision(str(checkpoint), parsed, torch.float32, "never", available=0) is None
    code = main(["quantize", "--quiet", "--recipe", "auto", "--model", str(checkpoint), "--data", str(wikitext_path),
                 "--stream", "always", "--out", str(tmp_path / "auto")])
    assert code == 2 and "cannot stream" in capsys.readouterr().err


def test_a_prefix_step_that_keeps_no_token_saves_and_loads(tokenizer, wikitext_stream, tmp_path,
                                                            monkeypatch) -> None:
    """Every candidate can fail the prefix's fp-loss check (it did on a random Llama-3.2-1B-shaped model); the
    step then keeps no token, and the artifact, in memory or streamed, saves, loads and evaluates the same."""
    monkeypatch.setattr("sinkquant.steps.prefix.MAX_NLL_INCREASE", -1.0)  # no prefix lowers the loss by 1 nat
    recipe = parse_recipe(RECIPES["static"], "static")
    quantized = apply_recipe(tiny_model("llama", tokenizer), recipe, wikitext_stream, ctx=CTX)
    assert quantized.prefix is not None and quantized.prefix.ids == []
    save(quantized, tmp_path / "memory")
    streamed = quantize_streaming(sharded_checkpoint("llama", tokenizer, tmp_path / "ckpt"), recipe, wikitext_stream,
                                  ctx=CTX, out=tmp_path / "streamed")
    assert streamed.prefix.ids == []
    plan = plan_windows(wikitext_stream, CTX, max_windows=2, calib_windows=2)
    expected = quantized.evaluate(wikitext_stream, plan, progress=False).ppl
    assert load(tmp_path / "memory").evaluate(wikitext_stream, plan, progress=False).ppl == expected
    assert load(tmp_path / "streamed", stream=True).evaluate(wikitext_stream, plan, progress=False).ppl == expected


def test_cli_eval_streams_a_model_and_an_artifact(tokenizer, wikitext_path, tmp_path, capsys) -> None:
    """`sinkquant eval --stream always` reads a safetensors model, or an artifact's integers, one decoder layer at
    a time: the same perplexity as in memory (`--stream never`)."""
    from sinkquant.cli import main

    checkpoint = sharded_checkpoint("qwen2", tokenizer, tmp_path / "checkpoint")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(RECIPES["static"]))
    text = tmp_path / "text.txt"  # a part of WikiText-2 (each command tokenizes its text)
    text.write_text(wikitext_path.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    common = ["--quiet", "--data", str(text), "--ctx", str(CTX), "--max-windows", "2"]
    assert main(["quantize", *common, "--recipe", str(recipe), "--model", str(checkpoint), "--stream", "never",
                 "--out", str(tmp_path / "artifact")]) == 0
    for model in (checkpoint, tmp_path / "artifact"):
        ppl = {}
        for mode in ("always", "never"):
            out = tmp_path / f"{model.name}-{mode}.json"
            assert main(["eval", *common, "--model", str(model), "--stream", mode, "--out", str(out)]) == 0
            ppl[mode] = json.loads(out.read_text())["ppl"]
        assert ("streaming" in capsys.readouterr().out) and ppl["always"] == ppl["never"], (model, ppl)


def test_chunked_reads_equal_the_stored_tensors(tmp_path, monkeypatch) -> None:
    """A tensor read in row chunks (a few rows per mapping here, 64 MB at scale) comes back exactly as stored,
    converted to the asked dtype, the last partial chunk included, in 64-byte aligned memory of its own."""
    from safetensors.torch import save_file

    from sinkquant.quant import stream

    generator = torch.Generator().manual_seed(0)
    stored = {"rows": torch.randn(37, 10, generator=generator).to(torch.bfloat16),
              "codes": torch.randint(-128, 127, (9, 4), generator=generator, dtype=torch.int8),
              "norm": torch.randn(10, generator=generator).to(torch.bfloat16)}
    save_file(stored, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(stream, "READ_CHUNK_BYTES", 3 * 10 * 4)  # 3 fp32 rows: 13 chunks, the last of one row
    files = dict.fromkeys(stored, tmp_path / "w.safetensors")
    as_fp32 = stream.read_tensors(files, list(stored), torch.float32)
    as_stored = stream.read_tensors(files, list(stored), None)
    for name, tensor in stored.items():
        expected = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        assert as_fp32[name].dtype == expected.dtype and torch.equal(as_fp32[name], expected)
        assert as_stored[name].dtype == tensor.dtype and torch.equal(as_stored[name], tensor)
        assert as_fp32[name].data_ptr() % 64 == 0 and as_stored[name].data_ptr() % 64 == 0
    with pytest.raises(SinkquantError, match="no tensor 'missing'"):
        stream.read_tensors(files, ["missing"], None)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16])
def test_a_tensor_saved_by_chunks_is_the_file_safetensors_writes(tmp_path, monkeypatch, dtype) -> None:
    """An embedding copied to its shard a few rows at a time (64 MB at scale) gives byte for byte the file
    safetensors' `save_file` writes for the whole tensor, in the stored dtype or converted."""
    from safetensors.torch import save_file

    from sinkquant.quant import stream

    tensor = torch.randn(37, 10, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / "stored.safetensors"))
    monkeypatch.setattr(stream, "READ_CHUNK_BYTES", 3 * 10 * 4)  # 13 chunks, the last of one row
    rows = stream.DiskRows(tmp_path / "stored.safetensors", "model.embed_tokens.weight")
    written = rows.save(tmp_path / "chunked.safetensors", dtype)
    expected = tensor if dtype is None else tensor.to(dtype)
    save_file({"model.embed_tokens.weight": expected}, str(tmp_path / "whole.safetensors"))
    assert written == expected.numel() * expected.element_size()
    assert (tmp_path / "chunked.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
