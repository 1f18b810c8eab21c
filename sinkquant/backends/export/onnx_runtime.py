"""An ONNX export folder (sinkquant.backends.export.onnx) as a model like any other: `load_onnx` verifies every
file against the manifest's sha256 and returns a LoadedModel whose `model` runs the graph through
`onnxruntime.InferenceSession`, behind the interface `sinkquant.perplexity.evaluate` and generation use, with the
fp prefix KV as the first past."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from sinkquant.adapters import adapter_for
from sinkquant.backends.export.onnx import (
    ATTENTION_MASK,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    ONNX_MANIFEST,
    PREFIX_FILE,
    past_names,
    present_names,
)
from sinkquant.errors import SinkquantError
from sinkquant.io import check_listed, read_manifest, recorded_digests, verify_digests
from sinkquant.models import LoadedModel, folder_tokenizer
from sinkquant.perplexity import Prefix

PREFILL_CHUNK = 256  # tokens per prompt call in generation (SharedKV); eval/results/onnx-speed.md


def past_length(past: dict[str, np.ndarray] | None) -> int:
    """Positions held by the graph's past arrays (0 for None)."""
    return next(iter(past.values())).shape[2] if past else 0


def is_onnx_export(path: str | os.PathLike) -> bool:
    """A folder written by `sinkquant export --format onnx`."""
    return (Path(path) / ONNX_MANIFEST).is_file()


def session_options(threads: int | None = None, optimized_path: str | os.PathLike | None = None) -> Any:
    """ONNX Runtime's options for an export: all graph optimizations (the QDQ -> integer kernel fusions), optionally
    a thread count and the optimized graph written out (to count which kernels run)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def cpu_session(path: str | os.PathLike, threads: int | None = None,
                optimized_path: str | os.PathLike | None = None) -> Any:
    """An `onnxruntime.InferenceSession` of the graph at `path` on the CPU execution provider with
    `session_options`; a graph ONNX Runtime cannot load is refused in one line."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(threads, optimized_path),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, one per failure kind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SinkquantError(f"{path}: ONNX Runtime cannot load it ({first})") from None


class OnnxCausalLM(nn.Module):
    """The graph behind a causal LM's forward: `input_ids` and an optional DynamicCache in, logits (and the cache
    extended by this call's KV, when `use_cache`) out. Holds no weights; the placeholder parameter tells callers
    the device (CPU)."""

    def __init__(self, session: Any, config: Any) -> None:
        super().__init__()
        self.session, self.config = session, config
        self.placeholder = nn.Parameter(torch.zeros(0), requires_grad=False)
        text = config.get_text_config(decoder=True)
        self.layers = text.num_hidden_layers
        heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.output_names = [o.name for o in session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {name: empty for index in range(self.layers) for name in past_names(index)}

    def run(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None, logits_to_keep: int = 0
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits of the last `logits_to_keep` positions, 0: all; the next call's past) for int64 ids [batch, seq]
        after `past` (None: no past)."""
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        total = past_length(past) + seq
        feeds = {"input_ids": input_ids, ATTENTION_MASK: np.ones((batch, total), np.int64),
                 LOGITS_TO_KEEP: np.asarray(logits_to_keep, np.int64), **past}
        outputs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        following = {}
        for index in range(self.layers):
            for source, target in zip(present_names(index), past_names(index), strict=True):
                following[target] = outputs[source]
        return outputs["logits"], following

    def forward(self, input_ids: torch.Tensor, past_key_values: DynamicCache | None = None, use_cache: bool = False,
                logits_to_keep: int = 0, **_: Any) -> CausalLMOutputWithPast:
        past = None
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            past = {}
            for index, layer in enumerate(past_key_values.layers):
                key, value = past_names(index)
                past[key] = layer.keys.detach().float().cpu().numpy()
                past[value] = layer.values.detach().float().cpu().numpy()
        logits, following = self.run(input_ids.cpu().numpy().astype(np.int64), past, logits_to_keep)
        cache = None
        if use_cache and past_key_values is not None:
            cache = DynamicCache(config=self.config)
            for index in range(self.layers):
                key, value = past_names(index)
                cache.update(torch.from_numpy(following[key]), torch.from_numpy(following[value]), index)
        return CausalLMOutputWithPast(logits=torch.from_numpy(logits), past_key_values=cache)


def load_prefix_arrays(folder: Path, manifest: dict[str, Any], model: OnnxCausalLM) -> dict[str, np.ndarray] | None:
    """The fp prefix KV, keyed by the graph's past input names; refused when mis-shaped."""
    ids = manifest.get("prefix_ids") or []
    if not ids:
        return None
    with np.load(folder / PREFIX_FILE) as data:
        arrays = {name: data[name] for name in data.files}
    expected = (1, model.kv_heads, len(ids), model.head_dim)
    for index in range(model.layers):
        for name in past_names(index):
            got = arrays.get(name)
            if got is None or got.shape != expected:
                raise SinkquantError(f"{folder / PREFIX_FILE}: array {name} is "
                                     f"{'missing' if got is None else got.shape}, expected {expected}")
    return arrays


def open_onnx_manifest(folder: Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest, its file digests) of an ONNX export folder: every file in it listed (an unlisted one is
    refused, not read) and, with `verify`, each file's sha256 checked; before anything else is read."""
    manifest = read_manifest(folder, ONNX_MANIFEST, "it is not an ONNX export; write one with "
                                                    "`sinkquant export --format onnx`")
    files = recorded_digests(folder, ONNX_MANIFEST, manifest, "files", MODEL_FILE,
                             "so the graph cannot be verified; the manifest is damaged (export again)")
    check_listed(folder, files, ONNX_MANIFEST)
    if verify:
        verify_digests(folder, files, str(folder))
    return manifest, files


def load_onnx(folder: str | os.PathLike, verify: bool = True, threads: int | None = None
              ) -> tuple[LoadedModel, Prefix | None, dict[str, Any]]:
    """(the model, its fp prefix with the KV as a DynamicCache, the manifest) of an ONNX export folder; a missing,
    partial or tampered file is refused in one line before ONNX Runtime reads it."""
    folder = Path(folder)
    manifest, files = open_onnx_manifest(folder, verify)
    session = cpu_session(folder / MODEL_FILE, threads)
    if ATTENTION_MASK not in {i.name for i in session.get_inputs()}:
        raise SinkquantError(f"{folder / MODEL_FILE}: the graph has no {ATTENTION_MASK} input (an export of an "
                             "earlier sinkquant); export the artifact again")
    config = AutoConfig.from_pretrained(folder)
    tokenizer = folder_tokenizer(folder)
    model = OnnxCausalLM(session, config)
    arrays = load_prefix_arrays(folder, manifest, model)
    prefix = None
    if arrays is not None:
        cache = DynamicCache(config=config)
        for index in range(model.layers):
            key, value = past_names(index)
            cache.update(torch.from_numpy(arrays[key]), torch.from_numpy(arrays[value]), index)
        prefix = Prefix(ids=list(manifest["prefix_ids"]), cache=cache)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(config), spec=str(folder),
                         source={"kind": "onnx", "model": manifest.get("model"),
                                 "sha256": files[MODEL_FILE]})
    return loaded, prefix, manifest


class SharedKV:
    """Generation through I/O binding with one KV buffer per layer shared between the graph's past input and its
    present output: ONNX Runtime's GroupQueryAttention writes each call's keys and values in place after the past,
    instead of copying the whole past into a new present that then comes back to Python, every step.

    A prompt runs in calls of at most `prefill_chunk` tokens: GroupQueryAttention's CPU kernel computes every
    query's scores against all keys of its call, masked ones included, so chunks skip most of the masked half
    (eval/results/onnx-speed.md measures the gain)."""

    def __init__(self, model: OnnxCausalLM, capacity: int, past: dict[str, np.ndarray] | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        import onnxruntime as ort

        limit = model.config.get_text_config(decoder=True).max_position_embeddings
        if capacity > limit:
            raise SinkquantError(f"a KV buffer of {capacity} positions exceeds the model's max_position_embeddings "
                                 f"({limit}), the length of the graph's RoPE tables")
        self.session, self.length, self.capacity = model.session, past_length(past), capacity
        self.prefill_chunk = prefill_chunk
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits")  # bound first: the first of the binding's outputs
        self.buffers: dict[str, np.ndarray] = {}
        for index in range(model.layers):
            for source, target in zip(past_names(index), present_names(index), strict=True):
                buffer = self.buffers[source] = np.zeros((1, model.kv_heads, capacity, model.head_dim), np.float32)
                if past is not None:
                    buffer[:, :, :self.length] = past[source]
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self.binding.bind_ortvalue_input(source, value)
                self.binding.bind_ortvalue_output(target, value)
        self.binding.bind_cpu_input(LOGITS_TO_KEEP, np.asarray(1, np.int64))

    def past(self) -> dict[str, np.ndarray]:
        """The KV held so far, as the graph's past arrays (copies), e.g. to continue in another session."""
        return {name: buffer[:, :, :self.length].copy() for name, buffer in self.buffers.items()}

    def next_logits(self, ids: np.ndarray) -> np.ndarray:
        """The last position's logits [vocab] after int64 `ids` [1, seq], whose KV joins the buffer."""
        if self.length + ids.shape[1] > self.capacity:
            raise SinkquantError(f"{self.length + ids.shape[1]} tokens do not fit the KV buffer of {self.capacity}")
        step = self.prefill_chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            chunk = ids[:, start:start + step]
            self.length += chunk.shape[1]
            self.binding.bind_cpu_input("input_ids", chunk)
            self.binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, self.length), np.int64))
            self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0, -1].copy()  # a view of a buffer the next call reuses


def prefix_arrays(prefix: Prefix | None) -> dict[str, np.ndarray] | None:
    """The fp prefix KV as the graph's past arrays (None without a prefix KV)."""
    if prefix is None or prefix.cache is None:
        return None
    past = {}
    for index, layer in enumerate(prefix.cache.layers):
        key, value = past_names(index)
        past[key], past[value] = layer.keys.numpy(), layer.values.numpy()
    return past


def generate(loaded: LoadedModel, prefix: Prefix | None, text: str, max_new_tokens: int = 20) -> str:
    """Greedy generation through ONNX Runtime with the prefix KV as the first past (a `SharedKV` buffer); the new
    text only."""
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    past = prefix_arrays(prefix)
    if prefix is not None and past is None:
        ids = list(prefix.ids) + ids
    kv = SharedKV(loaded.model, past_length(past) + len(ids) + max_new_tokens, past)
    new: list[int] = []
    step = np.asarray([ids], np.int64)
    for _ in range(max_new_tokens):
        token = int(kv.next_logits(step).argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        new.append(token)
        step = np.asarray([[token]], np.int64)
    return loaded.tokenizer.decode(new, skip_special_tokens=True)
