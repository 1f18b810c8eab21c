"""A model too large for memory, one decoder layer at a time: an empty skeleton (accelerate's
`init_empty_weights`: parameters on the meta device, buffers real) whose decoder layers are read from safetensors
with the lazy `safe_open` when needed and dropped after (`LayerStream`). The engine's streaming pipeline
(engine/stream.py) drives it; a session (steps/session.py) replays the steps' weight changes on every read.

Why not from_pretrained's own disk offload (device_map "disk") or accelerate's AlignDevicesHook: both reload the
checkpoint's tensors as they are, while a streamed layer must come back with the steps' changes (smoothing) and
after quantization must go to the artifact instead of back to the checkpoint; the hooks here are the few lines
that add that."""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from sinkquant.adapters import adapter_for
from sinkquant.errors import SinkquantError
from sinkquant.memory import release_freed_memory
from sinkquant.models import _first_line, folder_config
from sinkquant.quant.embeddings import embedding_weights
from sinkquant.quant.simulate import QuantLinear

WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints (the hub's and a streamed artifact's)
Transform = Callable[[int, nn.Module], None]



def checkpoint_index(folder: Path, only: list[Path] | None = None) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it: from the hub's `model.safetensors.index.json` when
    there is one, else from the header of each file (`only` these, e.g. an artifact's weights without its prefix
    KV; default every one in the folder; safe_open reads the header only)."""
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
    for file in only if only is not None else sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                files.update(dict.fromkeys(handle.keys(), file))  # noqa: SIM118 (safe_open is not iterable)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise SinkquantError(f"{file} is not a readable safetensors file: {_first_line(exc)}") from exc
    return files


# Rows of a large tensor copied per safetensors mapping: reading costs one such chunk beyond the result.
READ_CHUNK_BYTES = 64 << 20
# safetensors' names of the dtypes a streamed tensor is written in (its format's header field "dtype")
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def _read(file: Path, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor in memory torch allocates (64-byte aligned like the in-memory path's copies: kernels may round
    differently on unaligned data), floating point converted to `dtype`. A 2-D or larger tensor is copied in row
    chunks (`DiskRows.rows`), so it is never in memory twice: 0.5-1 GB more for an embedding otherwise."""
    with safe_open(file, framework="pt", device="cpu") as handle:
        piece = handle.get_slice(key)
        if len(piece.get_shape()) < 2 or piece.get_shape()[0] == 0:
            tensor = handle.get_tensor(key)
            convert = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
            return tensor.to(dtype) if convert else tensor.clone()
    rows = DiskRows(file, key)
    return rows.rows(0, rows.shape[0], dtype)


class DiskRows:
    """A tensor of two or more dimensions left in its safetensors file, read a range (or a set) of rows at a time:
    a streamed model's embeddings and lm_head (0.5-2 GB each at a 128k vocabulary) are never held whole. Each
    chunk of about READ_CHUNK_BYTES is copied from a mapping of its own that closes after it: safetensors' pread
    backend reads the whole tensor for any slice, and one mapping held open keeps every page it touched resident."""

    def __init__(self, file: Path, key: str) -> None:
        with safe_open(file, framework="pt", device="cpu") as handle:
            piece = handle.get_slice(key)
            self.shape = tuple(piece.get_shape())
            self.stored_dtype = piece[0:1].dtype
        self.file, self.key = file, key
        self.placeholder: nn.Parameter | None = None  # stands in the module (leave_embeddings_on_disk)

    def _empty(self, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
        floating = self.stored_dtype.is_floating_point
        return torch.empty((rows, *self.shape[1:]), dtype=dtype if dtype is not None and floating else
                           self.stored_dtype)

    def _chunk(self, out: torch.Tensor) -> int:
        """Rows per mapping: READ_CHUNK_BYTES of the result or of the stored values, whichever is wider."""
        width = max(out.element_size(), self.stored_dtype.itemsize)
        return max(1, READ_CHUNK_BYTES // (width * math.prod(self.shape[1:])))

    def rows(self, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start..end-1, floating point in `dtype` (None: as stored)."""
        out = self._empty(end - start, dtype)
        step = self._chunk(out)
        for first in range(start, end, step):
            last = min(first + step, end)  # safetensors' slices do not clamp
            with safe_open(self.file, framework="pt", device="cpu") as handle:
                out[first - start:last - start] = handle.get_slice(self.key)[first:last]
        return out

    def save(self, path: Path, dtype: torch.dtype | None = None) -> int:
        """This tensor written alone to a safetensors file at `path` one chunk of rows at a time (an embedding
        is never whole in memory; safetensors' own writers take whole tensors): the bytes `save_file` writes for
        it (a test compares them). Floating point in `dtype` (None: as stored). Returns the data bytes."""
        probe = self._empty(0, dtype)
        size = probe.element_size() * math.prod(self.shape)
        header = json.dumps({self.key: {"dtype": SAFETENSORS_DTYPES[probe.dtype], "shape": list(self.shape),
                                        "data_offsets": [0, size]}}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
        step = self._chunk(probe)
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", len(header)) + header)
            for first in range(0, self.shape[0], step):
                file.write(self.rows(first, min(first + step, self.shape[0]), dtype).view(torch.uint8).numpy().data)
        return size

    def gather(self, ids: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `ids` in their order, floating point in `dtype` (an embedding lookup's few hundred tokens)."""
        out = self._empty(len(ids), dtype)
        step = self._chunk(out)
        for first in range(0, len(ids), step):
            with safe_open(self.file, framework="pt", device="cpu") as handle:
                piece = handle.get_slice(self.key)
                for offset, row in enumerate(ids[first:first + step], first):
                    out[offset] = piece[row:row + 1][0]
        return out


def read_tensors(files: dict[str, Path], names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`names` read from their files one tensor at a time (`_read`), floating-point tensors in `dtype` (None: as
    stored): the values `models.read_weights` and from_pretrained give the in-memory model."""
    missing = [name for name in names if name not in files]
    if missing:
        raise SinkquantError(f"the checkpoint has no tensor {missing[0]!r}; it does not match its config.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            tensors[name] = _read(files[name], name, dtype)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise SinkquantError(f"{files[name]} is not a readable safetensors file: {_first_line(exc)}") from exc
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
        self.embeddings: dict[str, DiskRows] = {}  # embeddings and lm_head left on disk, by weight name
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
        names = [name for name, _ in tensor_slots(layer)]
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
        for name, tensor in tensor_slots(layer):
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


# Vocabulary rows of a disk-backed lm_head multiplied at a time (32 MB of logits for 1024 tokens).
HEAD_ROWS = 8192


def leave_embeddings_on_disk(model: PreTrainedModel, files: dict[str, Path]) -> dict[str, DiskRows]:
    """The input embedding and lm_head (tied or not) of a skeleton stay in the checkpoint: a lookup reads the rows
    of the tokens it is given (a compact table and remapped ids, so the module's own forward, e.g. Gemma's scaling,
    runs unchanged), lm_head multiplies HEAD_ROWS vocabulary rows at a time, widened to its input's dtype (its
    `disk_rows` lets the perplexity code do the same slice by slice). Rows come in the skeleton's dtype, the values
    an in-memory model loaded in that dtype holds. In the modules' place: `DiskRows.placeholder`, a CPU tensor of
    the weight's shape and dtype with one stored value (code that asks a parameter for the model's device or
    dtype still gets them). Returns '<module>.weight' -> its rows, a tied weight once."""
    weights = embedding_weights(model)
    disk = {name: DiskRows(files[name], name) for name in weights}
    rows_of = {id(weight): disk[name] for name, weight in weights.items()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table, head_rows = rows_of[id(embedding.weight)], head is not None and rows_of[id(head.weight)]
    for module in (embedding, head):
        if module is not None:
            rows = rows_of[id(module.weight)]
            if rows.placeholder is None:
                stand_in = torch.zeros((), dtype=module.weight.dtype).expand(module.weight.shape)
                rows.placeholder = nn.Parameter(stand_in, requires_grad=False)
            module._parameters["weight"] = rows.placeholder

    padding_idx = getattr(embedding, "padding_idx", None)

    def lookup(module: nn.Module, args: tuple) -> tuple:
        unique, inverse = torch.unique(args[0], return_inverse=True)
        rows = table.gather(unique.tolist(), table.placeholder.dtype)
        module._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
        module.padding_idx = None  # it only masks gradients, and indexes the full table
        return (inverse.reshape(args[0].shape), *args[1:])

    def drop(module: nn.Module, _args: tuple, _output: Any) -> None:
        module._parameters["weight"], module.padding_idx = table.placeholder, padding_idx

    embedding.register_forward_pre_hook(lookup)
    embedding.register_forward_hook(drop)
    if head is not None:
        head.disk_rows = head_rows
        head.forward = partial(_disk_head, head)
    return disk


def _disk_head(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """lm_head's forward with its weight on disk (`leave_embeddings_on_disk`)."""
    rows, bias = head.disk_rows, head.bias
    if x.numel() == 0:  # perplexity.next_token_nll's own slices do the scoring
        return x.new_empty((*x.shape[:-1], rows.shape[0]))
    parts = []
    for first in range(0, rows.shape[0], HEAD_ROWS):
        last = min(first + HEAD_ROWS, rows.shape[0])
        part_bias = None if bias is None else bias[first:last].to(x.dtype)
        parts.append(F.linear(x, rows.rows(first, last, x.dtype), part_bias))
    return torch.cat(parts, dim=-1)


def tensor_slots(layer: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """The layer's persistent tensors by name (its checkpoint entries), meta or not."""
    return [(name, tensor) for name, tensor in layer.state_dict(keep_vars=True).items()
            if not name.endswith(("act_scale", "act_zero_point"))]


def skeleton(folder: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The architecture in `folder`'s config.json with its parameters on the meta device (buffers real), in
    `dtype` (None: the config's own, else fp32): nothing is allocated until a layer is read."""
    config = folder_config(Path(folder))
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise SinkquantError(f"could not build the model of {folder}: {_first_line(exc)}") from exc
    return model.eval()


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], expected: list[str], folder: Path) -> None:
    """Stored tensors into `module` by name (replacing meta parameters); every expected one must be there."""
    tied = {"lm_head.weight"} if getattr(getattr(module, "config", None), "tie_word_embeddings", False) else set()
    missing = [n for n in expected if n not in tensors and n not in tied]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise SinkquantError(f"{folder}: {what}; the weights do not belong to this artifact's model")
    for name, tensor in tensors.items():
        set_module_tensor_to_device(module, name, "cpu", value=tensor)
