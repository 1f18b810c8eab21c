"""Streaming: quantize (and evaluate) a model larger than memory, one decoder layer at a time from its safetensors
shards. The model is an empty skeleton (accelerate's `init_empty_weights`: parameters on the meta device, buffers
real) with only the final norm read in; a decoder layer's tensors are read with safetensors' lazy `safe_open` when
the layer is needed and dropped after, and the embeddings and lm_head are read a few rows or a vocabulary slice at
a time as a forward needs them.

Two ways a layer is needed, both with the recipe's weight changes so far replayed on it (`Session.transform_layers`):

- the sequential pipeline (engine/pipeline.py) reads layer i, quantizes and calibrates it, writes its tensors to
  the artifact's shard i and frees it: each layer is read once and never held beside another;
- a whole-model forward before quantization (prefix selection and its profile, smoothing statistics, ACT, the fp
  reference perplexity) reads each layer in a pre-hook and frees it in a post-hook: one read of the weights per
  forward, the same arithmetic in the same order as in memory, so the artifact is bit-identical (tests check it).

The layer reading itself (skeleton, LayerStream, and why not accelerate's own offload) is quant/stream.py.
Memory: one decoder layer (fp and, while it is quantized, its integers, or GPTQ's Hessians) and the calibration
windows' activations for one layer; an embedding left on disk is copied to its shard a chunk of rows at a time."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file

from sinkquant.adapters import normalize
from sinkquant.backends.registry import BACKENDS
from sinkquant.data import TokenStream, WindowPlan
from sinkquant.engine.apply import QuantizedModel, apply_recipe, streaming_refusal
from sinkquant.engine.artifact import state_tensors, write_artifact
from sinkquant.errors import SinkquantError
from sinkquant.io import atomic_dir, atomic_write_json, check_output_dir
from sinkquant.models import LoadedModel, _check_model_folder, _folder_digest, folder_tokenizer
from sinkquant.perplexity import PerplexityResult, evaluate
from sinkquant.quant.embeddings import embedding_weights
from sinkquant.quant.stream import (
    WEIGHTS_INDEX,
    LayerStream,
    checkpoint_index,
    leave_embeddings_on_disk,
    read_tensors,
    skeleton,
)
from sinkquant.recipe import Recipe


def open_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                    embeddings_dtype: torch.dtype | None = None,
                    embeddings_on_disk: bool = False) -> tuple[LoadedModel, LayerStream]:
    """A safetensors model folder as a skeleton: everything but the decoder layers read in `dtype`, the decoder
    layers left on disk for the LayerStream. Refuses what `load_model` refuses (an artifact, pickle weights).

    `embeddings_on_disk`: the input embeddings and lm_head, the largest tensors otherwise held throughout (0.5 GB
    at Llama-3.2-1B, 2.1 GB at Llama-3.1-8B in bf16), stay in the checkpoint too and are read per use
    (`quant.stream.leave_embeddings_on_disk`, `stream.embeddings`); the lookups and logits are those of the
    in-memory model in `dtype`.

    `embeddings_dtype` (e.g. bf16, as a checkpoint stores them; ignored with `embeddings_on_disk`): the input
    embeddings and lm_head stay in it while everything else computes in `dtype`. Their values are the stored
    ones, so the decoder layers see exactly what an fp32 model loaded from the checkpoint gives them; only lm_head
    multiplies in the lower precision. For a CPU without bf16 matrix units (bf16 matmuls 4x slower than fp32 on
    this machine): memory of a bf16 model, speed of fp32 layers."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SinkquantError(f"streaming reads a local safetensors model folder; {folder} is not a folder")
    _check_model_folder(folder)
    model = normalize(skeleton(folder, dtype))
    tokenizer = folder_tokenizer(folder)
    files = checkpoint_index(folder)
    stream = LayerStream(model, files, dtype)
    layer_names = f"{stream.adapter.layers}."
    tied = model.config.tie_word_embeddings
    rest = [name for name in model.state_dict() if not name.startswith(layer_names)]
    wanted = [name for name in rest if name in files or not (tied and name == "lm_head.weight")]
    embeddings = set(embedding_weights(model))
    narrower = not embeddings_on_disk and embeddings_dtype not in (None, dtype)  # held, in embeddings_dtype
    apart = embeddings if embeddings_on_disk or narrower else set()
    tensors = read_tensors(files, [n for n in wanted if n not in apart], dtype)
    if narrower:
        tensors.update(read_tensors(files, [n for n in wanted if n in apart], embeddings_dtype))
    for name, tensor in tensors.items():
        set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=tensor.dtype)
    model.tie_weights()
    if embeddings_on_disk:
        stream.embeddings = leave_embeddings_on_disk(model, files)
    if narrower:
        model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.to(dtype))
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].to(embeddings_dtype),))
    source = {"kind": "folder", "path": str(folder), "sha256": _folder_digest(folder)}
    loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=stream.adapter, spec=str(folder), source=source)
    return loaded, stream


def evaluate_streaming(folder: str | Path, stream: TokenStream, plan: WindowPlan, bos: str = "auto",
                       dtype: torch.dtype = torch.float32, progress: bool = False,
                       embeddings_dtype: torch.dtype | None = None, batch_size: int = 1,
                       embeddings_on_disk: bool = True) -> PerplexityResult:
    """`perplexity.evaluate` of the model in `folder` (the fp or bf16 reference) without holding it whole: each
    window's forward reads the decoder layers one at a time, and (`embeddings_on_disk`) the embedding rows and
    lm_head slices it needs. Equals the in-memory result (a test checks it). `embeddings_dtype`: as
    `open_checkpoint`'s."""
    loaded, layers = open_checkpoint(folder, dtype, embeddings_dtype, embeddings_on_disk)
    with layers.streaming():
        return evaluate(loaded, stream, plan, bos=bos, progress=progress, batch_size=batch_size)


# The in-memory engine's peak RSS over the weights at its working dtype (1.27x on SmolLM2, 1.23x on a
# Qwen2-0.5B shape, issue 32): `auto` streams when this much would not fit in the memory available now.
IN_MEMORY_PEAK = 1.3
STREAM_MODES = ("auto", "always", "never")


def checkpoint_bytes(folder: Path, dtype: torch.dtype) -> int:
    """The weights of a safetensors folder in `dtype`, from the file headers alone."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(_shape(file, key)) * size for key, file in checkpoint_index(folder).items())


def _shape(file: Path, key: str) -> list[int]:
    with safe_open(file, framework="pt", device="cpu") as handle:
        return handle.get_slice(key).get_shape()


def memory_available() -> int:
    """Bytes the system could give this process now (MemAvailable; total physical memory where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def streaming_decision(spec: str, recipe: Recipe | None, dtype: torch.dtype, mode: str = "auto",
                       available: int | None = None) -> str | None:
    """Why the model `spec` (a safetensors folder or an artifact) is streamed, or None to run it in memory.
    `auto` (the default): stream a local safetensors folder when the in-memory engine would not fit
    (IN_MEMORY_PEAK x its weights in `dtype` above `available`, default: `memory_available()`) and `recipe`
    streams (None: evaluation, no recipe); `always`: stream or refuse, naming why; `never`: in memory."""
    if mode not in STREAM_MODES:
        raise SinkquantError(f"--stream {mode!r}; valid: {', '.join(STREAM_MODES)}")
    if mode == "never":
        return None
    folder = Path(spec).expanduser()
    problem = None if folder.is_dir() and any(folder.glob("*.safetensors")) else \
        f"{spec} is not a local safetensors folder (streaming reads one; `sinkquant convert` writes one)"
    problem = problem or (streaming_refusal(recipe) if recipe is not None else None)
    if mode == "always":
        if problem:
            raise SinkquantError(f"--stream always: {problem}")
        return "--stream always"
    return None if problem else memory_shortfall(spec, dtype, available)


def memory_shortfall(spec: str, dtype: torch.dtype, available: int | None = None) -> str | None:
    """Why the in-memory engine would not fit the local safetensors folder `spec` in `dtype`, or None (it fits,
    or `spec` is not a local folder: its size is unknown before loading)."""
    folder = Path(spec).expanduser()
    if not (folder.is_dir() and any(folder.glob("*.safetensors"))):
        return None
    need = IN_MEMORY_PEAK * checkpoint_bytes(folder, dtype)
    available = memory_available() if available is None else available
    if need <= available:
        return None
    return f"in memory it would take ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB are available"




def quantize_streaming(folder: str | Path, recipe: Recipe, stream: TokenStream, ctx: int, out: str | Path,
                       dtype: torch.dtype = torch.float32, overwrite: bool = False, progress: bool = False,
                       extra: dict[str, Any] | None = None, embeddings_dtype: torch.dtype | None = None,
                       embeddings_on_disk: bool = True) -> QuantizedModel:
    """Quantize the safetensors model in `folder` by `recipe` without ever holding it whole, writing the artifact
    to `out` as it goes: one shard per decoder layer, one for the rest and one per embedding left on disk, a
    hub-style index, all inside one atomic folder (an interrupted run leaves nothing that looks complete). The
    artifact equals `save` of the in-memory `apply_recipe` bit for bit and loads with `sinkquant.load`. Returns
    the (skeleton) result: its record and prefix; its layers are on disk. `dtype`, `embeddings_dtype`,
    `embeddings_on_disk`: as `open_checkpoint`'s; a recipe that stores its embeddings in another precision
    (scheme.embeddings) holds them in memory."""
    refusal = streaming_refusal(recipe)
    if refusal is not None:
        raise SinkquantError(f"recipe {recipe.name!r} cannot be streamed: {refusal}")
    check_output_dir(out, overwrite)
    embeddings = recipe.scheme.embeddings
    loaded, layers = open_checkpoint(folder, dtype, embeddings_dtype, embeddings_on_disk and embeddings is None)
    count = len(layers.layers)
    shards = count + 1 + len(layers.embeddings)
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map: dict[str, str] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:

        total = 0

        def write(tensors: dict[str, torch.Tensor], number: int) -> None:
            nonlocal total
            name = shard(number, shards)
            save_file(tensors, str(tmp / name))
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        backend = BACKENDS[recipe.backend]
        layers.on_finish = lambda index: write(
            state_tensors(loaded.model, backend, embeddings, lambda n: n.startswith(layers.prefix(index))), index + 1)
        with layers.streaming():
            quantized = apply_recipe(loaded, recipe, stream, ctx, progress=progress, layers=layers)
        unwritten = sorted(set(range(count)) - layers.finished)
        if unwritten:
            raise SinkquantError(f"streaming: decoder layers {unwritten} were never quantized; the recipe's scheme "
                                 "quantizes nothing in them")
        stand_ins = [rows.placeholder for rows in layers.embeddings.values()]
        on_disk = {name for name, tensor in loaded.model.state_dict(keep_vars=True).items()
                   if any(tensor is stand_in for stand_in in stand_ins)}
        write(state_tensors(loaded.model, backend, embeddings,
                            lambda n: not n.startswith(f"{layers.adapter.layers}.") and n not in on_disk), count + 1)
        for number, (name, rows) in enumerate(layers.embeddings.items(), count + 2):
            weight_map[name] = shard(number, shards)
            total += rows.save(tmp / weight_map[name], embeddings_dtype or dtype)  # a chunk of rows at a time
        quantized.record["stream"] = {"layer_reads": layers.reads, "read_seconds": layers.read_seconds,
                                      "layer_seconds": layers.layer_seconds, "shards": shards}
        atomic_write_json(tmp / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_artifact(tmp, quantized, extra, [*sorted(set(weight_map.values())), WEIGHTS_INDEX])
    return quantized
