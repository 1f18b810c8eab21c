"""ONNX export (sinkquant.backends.export.onnx) and running the exported folder through ONNX Runtime
(sinkquant.backends.export.onnx_runtime): round trip on tiny models of each supported architecture, the integer
kernels in ONNX Runtime's optimized graph, refusals before anything is written, damaged folders, and the exported
SmolLM2's perplexity against the native backend's."""

from __future__ import annotations

import collections
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from sinkquant.backends.export import export
from sinkquant.backends.export.onnx import DATA_FILE, MODEL_FILE, ONNX_MANIFEST, PREFIX_FILE, onnx_refusals
from sinkquant.backends.export.onnx_runtime import SharedKV, cpu_session, generate, load_onnx
from sinkquant.cli import main
from sinkquant.engine import save
from sinkquant.engine.apply import apply_recipe
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import evaluate
from sinkquant.recipe import load_recipe, parse_recipe
from tests.bounds import rounding_bound
from tests.tiny import tiny_model

REPO = Path(__file__).resolve().parent.parent
# The shipped W8A8 recipe (smoothing, 8 -> 1 weight-only exception layers on 2-layer models, int8 embeddings) with
# BOS as its fp prefix, at a tiny model's scale.
TINY_RECIPE = {
    "name": "tiny-w8a8-prefix-smooth-except", "description": "the shipped W8A8 recipe at tiny scale",
    "backend": "native",
    "calibration": {"windows": 2},
    "steps": [{"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}}, {"smooth": {"alpha": 0.5}},
              {"exceptions": {"top": 1}}],
    "scheme": {"weights": {"bits": 8, "granularity": "channel"},
               "activations": {"bits": 8, "mode": "static", "observer": "absmax"}, "embeddings": {"dtype": "int8"}},
}
INTEGER_MATMULS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul")


@pytest.fixture(scope="module")
def tiny_exports(smollm2, wikitext_stream, tmp_path_factory) -> dict[str, tuple]:
    """arch -> (QuantizedModel, export folder), the tiny recipe applied and exported once per module."""
    made = {}
    for arch in ("llama", "qwen2", "gemma3"):
        quantized = apply_recipe(tiny_model(arch, smollm2.tokenizer), parse_recipe(TINY_RECIPE), wikitext_stream,
                                 ctx=64)
        made[arch] = quantized, export(quantized, tmp_path_factory.mktemp(arch) / "onnx", format="onnx")
    return made


def _native_logits(quantized, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = quantized.model(input_ids=ids, past_key_values=quantized.cache_for_batch(1), use_cache=True)
    return out.logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_round_trip_matches_native(tiny_exports, arch) -> None:
    """ONNX Runtime's logits after the prefix KV equal the native backend's up to float rounding, in one call and
    split in two calls (the second one continuing from the first one's present KV: generation's path)."""
    quantized, folder = tiny_exports[arch]
    loaded, prefix, manifest = load_onnx(folder, threads=1)
    assert prefix is not None and prefix.ids == quantized.prefix.ids == manifest["prefix_ids"]
    assert len(manifest["layers"]["quantized"]) == 13 and len(manifest["layers"]["weight_only"]) == 2
    ids = torch.randint(3, 1000, (1, 80), generator=torch.Generator().manual_seed(0))  # past gemma's window of 64
    reference = _native_logits(quantized, ids)
    past = {name: np.load(folder / PREFIX_FILE)[name] for name in np.load(folder / PREFIX_FILE).files}
    logits, _ = loaded.model.run(ids.numpy(), past)
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 1e-4 * scale
    first, following = loaded.model.run(ids[:, :50].numpy(), past)
    second, _ = loaded.model.run(ids[:, 50:].numpy(), following)
    assert np.abs(np.concatenate([first, second], axis=1) - reference).max() < 1e-4 * scale
    # one buffer for past and present, written in place: the prompt in calls of 16 tokens, then one token a call
    kv = SharedKV(loaded.model, 96, past, prefill_chunk=16)
    shared = [kv.next_logits(ids[:, :50].numpy())] + [kv.next_logits(ids[:, t:t + 1].numpy()) for t in range(50, 80)]
    assert kv.length == 81 and np.abs(np.stack(shared) - reference[0, 49:]).max() < 1e-4 * scale
    assert generate(loaded, prefix, "The capital of France is", max_new_tokens=3) == \
        quantized.generate("The capital of France is", max_new_tokens=3)


def test_shared_kv_refuses_what_does_not_fit(tiny_exports) -> None:
    loaded, _, _ = load_onnx(tiny_exports["llama"][1])
    limit = loaded.model.config.max_position_embeddings
    with pytest.raises(SinkquantError, match=rf"exceeds the model's max_position_embeddings \({limit}\)"):
        SharedKV(loaded.model, limit + 1)
    with pytest.raises(SinkquantError, match="5 tokens do not fit the KV buffer of 4"):
        SharedKV(loaded.model, 4).next_logits(np.arange(5)[None])


def test_the_documented_onnxruntime_only_generation_runs(tiny_exports) -> None:
    """docs/deployment.md's serving example (numpy, onnxruntime and tokenizers only, KV buffers bound as past and
    present) on a tiny export decodes the tokens sinkquant's own generation does."""
    _, folder = tiny_exports["llama"]
    doc = (REPO / "docs" / "deployment.md").read_text()
    code = doc.split("### Running it with onnxruntime alone", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'folder = "onnx"' in code
    namespace: dict = {"print": lambda *_: None}
    exec(code.replace('folder = "onnx"', f"folder = {str(folder)!r}"), namespace)
    loaded, prefix, _ = load_onnx(folder)
    expected = generate(loaded, prefix, "The capital of France is", max_new_tokens=12)
    assert len(namespace["new"]) == 12 and namespace["tokenizer"].decode(namespace["new"]) == expected


def test_an_export_without_the_attention_mask_input_is_refused(tiny_exports, tmp_path) -> None:
    """A graph from before `attention_mask` (past length read from the past's shape) cannot run behind a shared KV
    buffer: refused in one line, naming the input."""
    _, folder = tiny_exports["llama"]
    old = tmp_path / "old"
    old.mkdir()
    for path in folder.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    graph = onnx.load(str(old / MODEL_FILE), load_external_data=False)
    for node in graph.graph.node:
        node.input[:] = ["mask" if name == "attention_mask" else name for name in node.input]
    next(i for i in graph.graph.input if i.name == "attention_mask").name = "mask"
    onnx.save(graph, str(old / MODEL_FILE))
    manifest = json.loads((old / ONNX_MANIFEST).read_text())
    manifest["files"][MODEL_FILE] = hashlib.sha256((old / MODEL_FILE).read_bytes()).hexdigest()
    (old / ONNX_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SinkquantError, match="has no attention_mask input .* export the artifact again"):
        load_onnx(old)


def test_optimized_graph_runs_integer_kernels(tiny_exports, tmp_path) -> None:
    """Every static W8A8 Linear becomes an integer MatMul in ONNX Runtime's optimized graph: none stays a float
    MatMul behind a DequantizeLinear. Every weight-only layer runs its int8 weight as the native backend does: an
    integer MatMul on int8 limbs of the activations for a few rows, a float MatMul beyond; none was turned into
    an int8-activation kernel (MatMulNBits, dynamic quantization)."""
    quantized, folder = tiny_exports["llama"]
    manifest = json.loads((folder / ONNX_MANIFEST).read_text())
    optimized = tmp_path / "optimized.onnx"
    cpu_session(folder / MODEL_FILE, 1, optimized)
    graph = onnx.load(str(optimized), load_external_data=False).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    assert sum(counts[op] for op in INTEGER_MATMULS) == len(manifest["layers"]["quantized"]) == 13
    assert counts["DequantizeLinear"] == counts["MatMulNBits"] == counts["DynamicQuantizeLinear"] == 0
    branches = {node.name: {a.name: collections.Counter(n.op_type for n in a.g.node) for a in node.attribute}
                for node in graph.node if node.op_type == "If"}
    assert len(branches) == len(manifest["layers"]["weight_only"]) == 2
    for branch in branches.values():
        assert branch["else_branch"]["MatMulInteger"] == branch["then_branch"]["MatMul"] == 1
        assert branch["else_branch"]["MatMul"] == branch["then_branch"]["MatMulInteger"] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attention_runs_in_one_fused_kernel_per_layer(tiny_exports, arch, tmp_path) -> None:
    """Causal (and sliding-window) attention over the past KV is ONNX Runtime's GroupQueryAttention, one per layer:
    no score matrix, mask or Softmax is left in the optimized graph."""
    quantized, folder = tiny_exports[arch]
    optimized = tmp_path / "optimized.onnx"
    cpu_session(folder / MODEL_FILE, 1, optimized)
    graph = onnx.load(str(optimized), load_external_data=False).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    assert counts["GroupQueryAttention"] == quantized.model.config.num_hidden_layers
    assert counts["Softmax"] == 0


@pytest.mark.parametrize("recipe, part", [
    ("w4a16-group64-native", "scheme.weights.bits=4"),
    ("w8a8-dynamic-token", "scheme.activations.mode='dynamic-token'"),
    ("w4a8kv8-prefix-clip", "scheme.kv"),
    ("w8a8-keep-sink", "step 'keep_sink'"),
    ("bnb-int8", "backend 'bnb-int8'"),
])
def test_refusals_name_the_part(recipe, part) -> None:
    refusals = onnx_refusals(load_recipe(REPO / "recipes" / f"{recipe}.yaml"))
    assert any(r.startswith(part) for r in refusals), refusals


def test_shipped_w8a8_recipe_is_exportable() -> None:
    assert onnx_refusals(load_recipe(REPO / "recipes" / "w8a8-prefix-smooth-except-native.yaml")) == []


def test_refused_before_anything_is_written(smollm2, wikitext_stream, tmp_path) -> None:
    data = yaml.safe_load((REPO / "recipes" / "w8a8-dynamic-token.yaml").read_text())
    quantized = apply_recipe(tiny_model("llama", smollm2.tokenizer), parse_recipe(data), wikitext_stream, ctx=64)
    with pytest.raises(SinkquantError, match=r"cannot export to ONNX: scheme\.activations\.mode='dynamic-token'"):
        export(quantized, tmp_path / "out", format="onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    ("flip", "has changed since it was written"),
    ("drop-prefix", "prefix_kv.npz is missing"),
    ("drop-manifest", "not an ONNX export"),
    ("edit-tokenizer", "tokenizer.json has changed since it was written"),
    ("add-file", "added_tokens.json is not listed in"),
])
def test_damaged_export_is_refused_in_one_line(tiny_exports, tmp_path, damage, message) -> None:
    _, folder = tiny_exports["llama"]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in folder.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    if damage == "flip":
        data = bytearray((damaged / DATA_FILE).read_bytes())
        data[len(data) // 2] ^= 1
        (damaged / DATA_FILE).write_bytes(bytes(data))
    elif damage == "drop-prefix":
        (damaged / PREFIX_FILE).unlink()
    elif damage == "edit-tokenizer":  # tokenizer and config are verified like the graph
        tokenizer = damaged / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text().replace('"the"', '"teh"', 1))
    elif damage == "add-file":  # a file the manifest does not list would be read unverified: refused
        (damaged / "added_tokens.json").write_text("{}")
    else:
        (damaged / ONNX_MANIFEST).unlink()
    with pytest.raises(SinkquantError, match=message) as info:
        load_onnx(damaged)
    assert "\n" not in str(info.value)


def test_cli_eval_runs_the_export(tiny_exports, wikitext_path, tmp_path, capsys) -> None:
    """`sinkquant eval --model EXPORT` goes through ONNX Runtime and the same evaluator as the native model."""
    quantized, folder = tiny_exports["llama"]
    out = tmp_path / "eval.json"
    code = main(["eval", "--quiet", "--model", str(folder), "--data", str(wikitext_path), "--ctx", "64",
                 "--max-windows", "2", "--out", str(out)])
    assert code in (0, None)
    assert "run by ONNX Runtime behind its fp prefix KV" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["context_cached"] and result["model"]["kind"] == "onnx"
    code = main(["eval", "--quiet", "--model", str(folder), "--data", str(wikitext_path), "--ctx", "64",
                 "--max-windows", "2", "--batch-size", "2", "--out", str(out)])
    assert code in (0, None)
    assert "--batch-size 2 not used: a quantized artifact or ONNX export" in capsys.readouterr().out
    assert json.loads(out.read_text())["ppl"] == result["ppl"]


def test_cli_export_writes_the_onnx_folder(tiny_exports, tmp_path, capsys) -> None:
    """`sinkquant export ART --format onnx` from an artifact on disk: the same graph inputs and prefix."""
    quantized, folder = tiny_exports["llama"]
    save(quantized, tmp_path / "art")
    code = main(["export", str(tmp_path / "art"), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert code in (0, None)
    assert "(onnx); prefix KV beside it (1 tokens)" in capsys.readouterr().out
    _, prefix, manifest = load_onnx(tmp_path / "onnx")
    assert prefix.ids == manifest["prefix_ids"] == quantized.prefix.ids
    assert manifest["layers"] == json.loads((folder / ONNX_MANIFEST).read_text())["layers"]


@pytest.mark.slow
@pytest.mark.long
def test_smollm2_export_perplexity_equals_native(smollm2, wikitext_stream, eval_and_calib, tmp_path) -> None:
    """The shipped W8A8 recipe (BOS as its prefix) exported to ONNX: ONNX Runtime's perplexity is the native
    backend's within 0.3% plus the native model's own float32-vs-float64 spread (static activations are rounded,
    so a value within float rounding of a grid boundary lands one level apart)."""
    plan, _, _ = eval_and_calib(128, 2, 1)
    data = yaml.safe_load((REPO / "recipes" / "w8a8-prefix-smooth-except-native.yaml").read_text())
    data["steps"][0] = {"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}}
    quantized = apply_recipe(smollm2, parse_recipe(data), wikitext_stream, ctx=128, copy=True)
    folder = export(quantized, tmp_path / "onnx", format="onnx")
    loaded, prefix, _ = load_onnx(folder)
    exported = evaluate(loaded, wikitext_stream, plan, bos="never", prefix=prefix, progress=False).ppl
    native = quantized.evaluate(wikitext_stream, plan, progress=False).ppl
    native64 = evaluate(smollm2, wikitext_stream, plan, prefix=quantized.prefix,
                        model=copy.deepcopy(quantized.model).double(), progress=False).ppl
    print(f"ONNX round trip: exported {exported:.4f} native {native:.4f} native f64 {native64:.4f}")
    assert abs(exported / native - 1) < rounding_bound(3e-3, native, native64)


def test_cli_eval_refuses_a_short_text_before_onnx_runtime_loads(tiny_exports, tmp_path, capsys) -> None:
    """The export's tokenizer is read and the text tokenized before ONNX Runtime opens the graph: with an
    unreadable graph (and --no-verify), a text too short for the windows is what gets reported."""
    _, folder = tiny_exports["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / DATA_FILE).write_bytes(b"not a graph")
    text = tmp_path / "short.txt"
    text.write_text("hello " * 30)
    code = main(["eval", "--quiet", "--model", str(broken), "--data", str(text), "--ctx", "64", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and "windows of --ctx 64; this run needs" in err and "ONNX Runtime" not in err, err
