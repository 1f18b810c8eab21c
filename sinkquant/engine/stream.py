"""Streaming: quantize (and evaluate) a model larger than memory, one decoder layer at a time from its safetensors
shards. The model is an empty skeleton (accelerate's `init_empty_weights`: parameters on the meta device, buffers
real) with only the embeddings, the final norm and lm_head read in; a decoder layer's tensors are read with
safetensors' lazy `safe_open` when the layer is needed and dropped after.

Two ways a layer is needed, both with the recipe's weight changes so far replayed on it (`Session.transform_layers`):

- the sequential pipeline (engine/pipeline.py) reads layer i, quantizes and calibrates it, writes its tensors to
  the artifact's shard i and frees it: each layer is read once and never held beside another;
- a whole-model forward before quantization (prefix selection and its profile, smoothing statistics, ACT, the fp
  reference perplexity) reads each layer in a pre-hook and frees it in a post-hook: one read of the weights per
  forward, the same arithmetic in the same order as in memory, so the artifact is bit-identical (tests check it).

Why not from_pretrained's own disk offload (device_map "disk") or accelerate's AlignDevicesHook: both reload the
checkpoint's tensors as they are, while a streamed layer must come back with the steps' changes (smoothing) and
after quantization must go to the artifact instead of back to the checkpoint; the hooks here are the few lines
that add that. Memory: the embeddings and lm_head, one decoder layer (fp and, while it is quantized, its
integers), and the calibration windows' activations for one layer."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sinkquant.adapters import adapter_for, normalize
from sinkquant.artifacts import atomic_dir, atomic_write_json, check_output_dir
from sinkquant.data import TokenStream, WindowPlan
from sinkquant.engine.apply import QuantizedModel, apply_recipe
from sinkquant.engine.artifact import (
    QUANT_BUFFERS,
    WEIGHTS,
    WEIGHTS_INDEX,
    restore_quantized,
    state_tensors,
    write_artifact,
)
from sinkquant.engine.backends import BACKENDS
from sinkquant.errors import SinkquantError
from sinkquant.memory import release_freed_memory
from sinkquant.models import LoadedModel, _check_model_folder, _first_line, _folder_config, _folder_digest
from sinkquant.perplexity import PerplexityResult, evaluate
from sinkquant.quant.embeddings import embedding_weights
from sinkquant.quant.embeddings import restore as restore_embedding
from sinkquant.quant.simulate import QuantLinear
from sinkquant.recipes.schema import Recipe

if TYPE_CHECKING:
    from sinkquant.engine.session import Session

Transform = Callable[[int, nn.Module], None]
# Steps whose whole-model forwards come before quantization and whose weight changes go through
# `Session.transform_layers`; the others (rotate, clip) change or run the whole model after that.
STREAMED_STEPS = ("prefix", "smooth", "exceptions", "keep_sink", "act")


def checkpoint_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it: from the hub's `model.safetensors.index.json` when
    there is one, else from each file's header (safe_open reads the header only)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: folder / file for name, file in weight_map.items() if Path(file).name == file}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SinkquantError(f"{index}: not a readable weight index ({_first_line(exc)})") from None
        if len(files) != len(weight_map):
            raise SinkquantError(f"{index}: the weight_map names a file outside the folder; valid: file names")
        return files
    files: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                files.update(dict.fromkeys(handle.keys(), file))  # noqa: SIM118 (safe_open is not iterable)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise SinkquantError(f"{file} is not a readable safetensors file: {_first_line(exc)}") from exc
    return files


def _read(handle: Any, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor in memory of its own (safetensors' pread backend reads it into a fresh buffer), converted to
    `dtype` if floating point. A tensor already in `dtype` is kept as read, not copied (a 0.5-1 GB embedding
    would briefly be held twice), unless its buffer is not 64-byte aligned like torch's own allocations:
    kernels may round differently on unaligned data, and the in-memory path computes on torch's copies."""
    tensor = handle.get_tensor(key)
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def read_tensors(files: dict[str, Path], names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`names` read from their files (pread, one tensor at a time) into memory torch allocates, floating-point
    tensors in `dtype` (None: as stored): the values `models.read_weights` and from_pretrained give the in-memory
    model."""
    missing = [name for name in names if name not in files]
    if missing:
        raise SinkquantError(f"the checkpoint has no tensor {missing[0]!r}; it does not match its config.json")
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu", backend="pread") as handle:
                for key in keys:
                    tensors[key] = _read(handle, key, dtype)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise SinkquantError(f"{file} is not a readable safetensors file: {_first_line(exc)}") from exc
    return tensors


class LayerStream:
    """The decoder layers of a skeleton model, read from the checkpoint on demand. `load(i)` reads layer i and
    replays the transforms; `free(i)` drops its tensors; `finish(i)` hands a quantized layer to `on_finish` (the
    artifact writer) and frees it for good. While `streaming()` is active, a whole-model forward loads and frees
    each layer around its call."""

    def __init__(self, model: PreTrainedModel, files: dict[str, Path], dtype: torch.dtype | None,
                 reader: Transform | None = None) -> None:
        self.adapter = adapter_for(model)
        self.layers = self.adapter.decoder_layers(model)
        self.files, self.dtype = files, dtype
        self.reader = reader or self._read_checkpoint  # fills a layer's tensors: a checkpoint's, or an artifact's
        self.transforms: list[Transform] = []
        self.loaded: set[int] = set()
        self.finished: set[int] = set()
        self.on_finish: Callable[[int], None] | None = None
        self.reads = 0  # layer reads from disk, for the record
        self.read_seconds = 0.0
        self.layer_seconds: list[float] = []  # each layer's turn in the pipeline: read, quantize, calibrate, write
        self._turn: float | None = None

    def prefix(self, index: int) -> str:
        return f"{self.adapter.layers}.{index}."

    def add_transform(self, transform: Transform) -> None:
        if self.finished:
            raise SinkquantError("streaming: a step changed the weights after layers were quantized and written; "
                                 "this recipe cannot be streamed (quantize it in memory)")
        self.transforms.append(transform)

    def load(self, index: int) -> None:
        """Layer `index` for the pipeline's turn (a forward's hooks read it with `_read`)."""
        if self._turn is None:
            self._turn = time.perf_counter()
        self._read(index)

    def _read(self, index: int) -> None:
        if index in self.loaded:
            return
        if index in self.finished:
            raise SinkquantError(f"streaming: decoder layer {index} is already quantized and written; a whole-model "
                                 "forward after quantization is not possible while streaming (evaluate the artifact)")
        clock = time.perf_counter()
        layer = self.layers[index]
        self.reader(index, layer)
        for transform in self.transforms:
            transform(index, layer)
        self.loaded.add(index)
        self.reads += 1
        self.read_seconds += time.perf_counter() - clock

    def _read_checkpoint(self, index: int, layer: nn.Module) -> None:
        names = [name for name, _ in _tensor_slots(layer)]
        tensors = read_tensors(self.files, [self.prefix(index) + n for n in names], self.dtype)
        for name in names:
            set_module_tensor_to_device(layer, name, "cpu", value=tensors.pop(self.prefix(index) + name))

    def free(self, index: int) -> None:
        """Every tensor of the layer back to the meta device, except a QuantLinear's activation scale and zero
        point (two scalars, which later steps read: exceptions ranks layers by them)."""
        layer = self.layers[index]
        for module in layer.modules():
            if isinstance(module, QuantLinear):
                module.weight_int = module.weight_scale = module.weight_zero_point = module.held = None
        for name, tensor in _tensor_slots(layer):
            if tensor is not None and tensor.device.type != "meta":
                set_module_tensor_to_device(layer, name, "meta")
        self.loaded.discard(index)
        release_freed_memory()

    def finish(self, index: int) -> None:
        if self.on_finish is not None:
            self.on_finish(index)
        self.finished.add(index)
        self.free(index)
        now = time.perf_counter()
        self.layer_seconds.append(now - (self._turn or now))
        self._turn = now

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Whole-model forwards read each layer around its call (pre-hook first, before keep hooks and the like)."""

        hooked: set[int] = set()  # layers this forward read (the pipeline's own stay until it finishes them)

        def before(module: nn.Module, _args: Any) -> None:
            index = module._sinkquant_stream_index
            if index not in self.loaded:
                self._read(index)
                hooked.add(index)

        def after(module: nn.Module, _args: Any, _output: Any) -> None:
            index = module._sinkquant_stream_index
            if index in hooked:
                hooked.discard(index)
                self.free(index)

        handles = []
        for index, layer in enumerate(self.layers):
            layer._sinkquant_stream_index = index
            handles.append(layer.register_forward_pre_hook(before, prepend=True))
            handles.append(layer.register_forward_hook(after))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _tensor_slots(layer: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """The layer's persistent tensors by name (its checkpoint entries), meta or not."""
    return [(name, tensor) for name, tensor in layer.state_dict(keep_vars=True).items()
            if not name.endswith(("act_scale", "act_zero_point"))]


def skeleton(folder: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The architecture in `folder`'s config.json with its parameters on the meta device (buffers real), in
    `dtype` (None: the config's own, else fp32): nothing is allocated until a layer is read."""
    config = _folder_config(Path(folder))
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise SinkquantError(f"could not build the model of {folder}: {_first_line(exc)}") from exc
    return model.eval()


def artifact_layers(folder: Path, session: Session) -> LayerStream:
    """An artifact's tensors into the quantized skeleton of `session` (its QuantLinears in place): embeddings, final
    norm, lm_head and every activation scale now (exceptions and checks read them), each decoder layer's integer
    weights when a forward reads it. Tensors keep their stored dtype (a bf16 model stays bf16)."""
    model = session.model
    files = checkpoint_index(folder)
    layer_names = f"{session.loaded.adapter.layers}."
    scales = [n for n in files if n.startswith(layer_names) and n.endswith(("act_scale", "act_zero_point"))]
    for name, tensor in read_tensors(files, scales, None).items():
        module_name, _, buffer = name.rpartition(".")
        setattr(model.get_submodule(module_name), buffer, tensor)
    rest = read_tensors(files, [n for n in files if not n.startswith(layer_names)], None)
    for name, weight in embedding_weights(model).items():
        restore_embedding(rest, name, tuple(weight.shape), WEIGHTS)
    _assign(model, rest, [n for n in model.state_dict() if not n.startswith(layer_names)], folder)
    model.tie_weights()

    def read(index: int, layer: nn.Module) -> None:
        prefix = f"{layer_names}{index}."
        tensors = {n[len(prefix):]: t for n, t in read_tensors(
            files, [n for n in files if n.startswith(prefix) and n not in scales], None).items()}
        for name, module in layer.named_modules():
            if isinstance(module, QuantLinear):
                restore_quantized(name, module, tensors)
        _assign(layer, tensors, [n for n, _ in _tensor_slots(layer) if not n.endswith(QUANT_BUFFERS)], folder)

    return LayerStream(model, files, None, reader=read)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], expected: list[str], folder: Path) -> None:
    """Stored tensors into `module` by name (replacing meta parameters); every expected one must be there."""
    tied = {"lm_head.weight"} if getattr(getattr(module, "config", None), "tie_word_embeddings", False) else set()
    missing = [n for n in expected if n not in tensors and n not in tied]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise SinkquantError(f"{folder}: {what}; the weights do not belong to this artifact's model")
    for name, tensor in tensors.items():
        set_module_tensor_to_device(module, name, "cpu", value=tensor)


def open_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                    embeddings_dtype: torch.dtype | None = None) -> tuple[LoadedModel, LayerStream]:
    """A safetensors model folder as a skeleton: everything but the decoder layers read in `dtype`, the decoder
    layers left on disk for the LayerStream. Refuses what `load_model` refuses (an artifact, pickle weights).

    `embeddings_dtype` (e.g. bf16, as a checkpoint stores them): the input embeddings and lm_head, the largest
    tensors held throughout, stay in it while everything else computes in `dtype`. Their values are the stored
    ones, so the decoder layers see exactly what an fp32 model loaded from the checkpoint gives them; only lm_head
    multiplies in the lower precision. For a CPU without bf16 matrix units (bf16 matmuls 4x slower than fp32 on
    this machine): memory of a bf16 model, speed of fp32 layers."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SinkquantError(f"streaming reads a local safetensors model folder; {folder} is not a folder")
    _check_model_folder(folder)
    model = normalize(skeleton(folder, dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SinkquantError(f"could not load model folder {folder}: {_first_line(exc)}") from exc
    files = checkpoint_index(folder)
    stream = LayerStream(model, files, dtype)
    layer_names = f"{stream.adapter.layers}."
    tied = model.config.tie_word_embeddings
    rest = [name for name in model.state_dict() if not name.startswith(layer_names)]
    wanted = [name for name in rest if name in files or not (tied and name == "lm_head.weight")]
    embeddings = set(embedding_weights(model)) if embeddings_dtype not in (None, dtype) else set()
    tensors = read_tensors(files, [n for n in wanted if n not in embeddings], dtype)
    tensors.update(read_tensors(files, [n for n in wanted if n in embeddings], embeddings_dtype))
    for name, tensor in tensors.items():
        set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=tensor.dtype)
    model.tie_weights()
    if embeddings:
        model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.to(dtype))
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].to(embeddings_dtype),))
    source = {"kind": "folder", "path": str(folder), "sha256": _folder_digest(folder)}
    loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=stream.adapter, spec=str(folder), source=source)
    return loaded, stream


def evaluate_streaming(folder: str | Path, stream: TokenStream, plan: WindowPlan, bos: str = "auto",
                       dtype: torch.dtype = torch.float32, progress: bool = False,
                       embeddings_dtype: torch.dtype | None = None) -> PerplexityResult:
    """`perplexity.evaluate` of the model in `folder` (the fp or bf16 reference) without holding it whole: each
    window's forward reads the decoder layers one at a time. Equals the in-memory result (a test checks it).
    `embeddings_dtype`: as `open_checkpoint`'s."""
    loaded, layers = open_checkpoint(folder, dtype, embeddings_dtype)
    with layers.streaming():
        return evaluate(loaded, stream, plan, bos=bos, progress=progress)


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


def streaming_decision(spec: str, recipe: Recipe, dtype: torch.dtype, mode: str = "auto",
                       available: int | None = None) -> str | None:
    """Why the model `spec` is streamed, or None to quantize in memory. `auto` (the default): stream a local
    safetensors folder when the in-memory engine would not fit (IN_MEMORY_PEAK x its weights in `dtype` above
    `available`, default: `memory_available()`) and the recipe streams; `always`: stream or refuse, naming why;
    `never`: in memory."""
    if mode not in STREAM_MODES:
        raise SinkquantError(f"--stream {mode!r}; valid: {', '.join(STREAM_MODES)}")
    if mode == "never":
        return None
    folder = Path(spec).expanduser()
    problem = None if folder.is_dir() and any(folder.glob("*.safetensors")) else \
        f"{spec} is not a local safetensors folder (streaming reads one; `sinkquant convert` writes one)"
    problem = problem or streaming_refusal(recipe)
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


def streaming_refusal(recipe: Recipe) -> str | None:
    """Why `recipe` cannot be streamed, or None."""
    backend = BACKENDS[recipe.backend]
    if backend.peer is not None or backend.finalize is not None:
        return (f"backend {recipe.backend!r} converts the whole model; stream its simulated twin (the artifact's "
                "tensors are the same) or quantize in memory")
    if recipe.calibration.pipeline != "sequential":
        return "calibration.pipeline 'whole' runs whole-model forwards after quantization; use 'sequential'"
    for step in recipe.steps:
        if step.name not in STREAMED_STEPS:
            return (f"step {step.name!r} changes the whole model at once or runs it after quantization (streamed: "
                    f"{', '.join(STREAMED_STEPS)})")
    return None


def quantize_streaming(folder: str | Path, recipe: Recipe, stream: TokenStream, ctx: int, out: str | Path,
                       dtype: torch.dtype = torch.float32, overwrite: bool = False, progress: bool = False,
                       extra: dict[str, Any] | None = None, embeddings_dtype: torch.dtype | None = None
                       ) -> QuantizedModel:
    """Quantize the safetensors model in `folder` by `recipe` without ever holding it whole, writing the artifact
    to `out` as it goes: one shard per decoder layer plus one for the rest, a hub-style index, all inside one
    atomic folder (an interrupted run leaves nothing that looks complete). The artifact equals `save` of the
    in-memory `apply_recipe` bit for bit and loads with `sinkquant.load`. Returns the (skeleton) result: its
    record and prefix; its layers are on disk. `dtype`, `embeddings_dtype`: as `open_checkpoint`'s."""
    refusal = streaming_refusal(recipe)
    if refusal is not None:
        raise SinkquantError(f"recipe {recipe.name!r} cannot be streamed: {refusal}")
    check_output_dir(out, overwrite)
    loaded, layers = open_checkpoint(folder, dtype, embeddings_dtype)
    count = len(layers.layers)
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map: dict[str, str] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:

        total = 0

        def write(tensors: dict[str, torch.Tensor], number: int) -> None:
            nonlocal total
            name = shard(number, count + 1)
            save_file(tensors, str(tmp / name))
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        embeddings = recipe.scheme.embeddings
        layers.on_finish = lambda index: write(
            state_tensors(loaded.model, embeddings, lambda n: n.startswith(layers.prefix(index))), index + 1)
        with layers.streaming():
            quantized = apply_recipe(loaded, recipe, stream, ctx, progress=progress, layers=layers)
        unwritten = sorted(set(range(count)) - layers.finished)
        if unwritten:
            raise SinkquantError(f"streaming: decoder layers {unwritten} were never quantized; the recipe's scheme "
                                 "quantizes nothing in them")
        write(state_tensors(loaded.model, embeddings, lambda n: not n.startswith(f"{layers.adapter.layers}.")),
              count + 1)
        quantized.record["stream"] = {"layer_reads": layers.reads, "read_seconds": layers.read_seconds,
                                      "layer_seconds": layers.layer_seconds, "shards": count + 1}
        atomic_write_json(tmp / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_artifact(tmp, quantized, extra, [*sorted(set(weight_map.values())), WEIGHTS_INDEX])
    return quantized

