"""A quantized model on disk: integer weights with their scales (safetensors), static activation scales, the
prefix KV, the resolved recipe, what each step did, versions and data hashes, and the sha256 of every file, all
written atomically. `load` verifies the files against the manifest, rebuilds the quantized structure and lets
each step restore what the tensors alone do not hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from sinkquant.adapters import adapter_for, normalize
from sinkquant.backends.registry import BACKENDS, Backend
from sinkquant.engine.apply import QuantizedModel, quantize_structure, streaming_refusal
from sinkquant.errors import SinkquantError
from sinkquant.io import (
    ARTIFACT_MANIFEST,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_listed,
    file_digests,
    folder_files,
    library_versions,
    read_manifest,
    read_structured,
    sha256_bytes,
    to_json,
    verify_digests,
)
from sinkquant.models import LoadedModel, empty_model, folder_tokenizer, model_device
from sinkquant.perplexity import Prefix
from sinkquant.quant.embeddings import embedding_weights
from sinkquant.quant.embeddings import restore as restore_embedding
from sinkquant.quant.embeddings import stored as stored_embedding
from sinkquant.quant.qweight import QuantizedWeight
from sinkquant.quant.scheme import KeepPolicy
from sinkquant.quant.simulate import QuantLinear
from sinkquant.quant.stream import (
    WEIGHTS_INDEX,
    LayerStream,
    assign_tensors,
    checkpoint_index,
    leave_embeddings_on_disk,
    read_tensors,
    skeleton,
    tensor_slots,
)
from sinkquant.recipe import Recipe, parse_recipe
from sinkquant.steps.session import Session

FORMAT_VERSION = 2
META = ARTIFACT_MANIFEST
WEIGHTS = "model.safetensors"
PREFIX = "prefix.safetensors"
RECIPE = "recipe.yaml"
QUANT_BUFFERS = ("weight_int", "weight_scale", "weight_zero_point", "act_scale", "act_zero_point")


def _prefix_tensors(prefix: Prefix) -> dict[str, torch.Tensor]:
    """The ids and each layer's KV; a prefix step that kept no token writes its empty ids alone."""
    tensors = {"ids": torch.tensor(prefix.ids, dtype=torch.long)}
    for index, layer in enumerate(prefix.cache.layers if prefix.cache is not None else ()):
        tensors[f"layers.{index}.keys"] = layer.keys.contiguous().cpu()
        tensors[f"layers.{index}.values"] = layer.values.contiguous().cpu()
    return tensors


def _prefix_from(tensors: dict[str, torch.Tensor], config, device: torch.device) -> Prefix:
    if "ids" not in tensors:
        raise SinkquantError(f"{PREFIX}: tensor 'ids' is missing")
    if tensors["ids"].numel() == 0 and len(tensors) == 1:
        return Prefix(ids=[], cache=None)  # the prefix step kept no token
    cache = DynamicCache(config=config)
    index = 0
    while f"layers.{index}.keys" in tensors:
        cache.update(tensors[f"layers.{index}.keys"].to(device), tensors[f"layers.{index}.values"].to(device), index)
        index += 1
    if index != config.num_hidden_layers:
        raise SinkquantError(f"{PREFIX} holds KV for {index} layers, the model has {config.num_hidden_layers}")
    return Prefix(ids=tensors["ids"].tolist(), cache=cache)


def _state(quantized: QuantizedModel) -> dict[str, torch.Tensor]:
    """The model's tensors with every quantized weight as integers (int4 packed two per byte), the same files
    for the simulated and the native layers; embeddings in scheme.embeddings' dtype when it is set."""
    recipe = quantized.recipe
    return state_tensors(quantized.model, BACKENDS[recipe.backend], recipe.scheme.embeddings)


def state_tensors(model: torch.nn.Module, backend: Backend, embeddings: Any,
                  include: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """`_state` of the tensors whose names `include` accepts (all by default): streaming writes each decoder
    layer's as it is done and the rest once. `backend` says which entries hold a layer's integer weight."""
    embedding_ptrs = {w.data_ptr() for w in embedding_weights(model).values()}
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        if include is not None and not include(name):
            continue
        if tensor.data_ptr() in seen and tensor.numel():  # tied embeddings: stored once
            continue
        seen[tensor.data_ptr()] = name
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        qweight = backend.stored_weight(module, leaf)
        if qweight is not None:
            packed = qweight.bits <= 4
            state[f"{module_name}.weight_{'packed' if packed else 'int'}"] = \
                (qweight.packed() if packed else qweight.qweight).contiguous().cpu()
            continue
        if embeddings is not None and tensor.data_ptr() in embedding_ptrs:
            state.update(stored_embedding(name, tensor, embeddings.dtype))
            continue
        state[name] = tensor.contiguous().cpu()
    return state


def stored_bytes(quantized: QuantizedModel) -> int | None:
    """Bytes of the tensors `save` writes for this model (integers, scales, 16-bit or fp32 rest); None for a
    peer library's model, which its own format stores."""
    return BACKENDS[quantized.recipe.backend].stored_bytes(
        lambda: sum(t.numel() * t.element_size() for t in _state(quantized).values()))


def save(quantized: QuantizedModel, out: str | Path, extra: dict[str, Any] | None = None,
         overwrite: bool = False, attachments: dict[str, str] | None = None) -> Path:
    """Everything needed to reload and re-evaluate; nothing machine-specific in the recipe. `attachments`: text
    files (name -> content) written into the artifact and listed in its manifest, e.g. an auto recipe's trace."""
    backend = BACKENDS[quantized.recipe.backend]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _attach(tmp, attachments)
        quantized.base.tokenizer.save_pretrained(tmp)
        files = backend.save_model(quantized.model, tmp, lambda: _write_model(tmp, quantized))
        _write_manifest(tmp, quantized, extra, files)
    return Path(out)


def _write_model(tmp: Path, quantized: QuantizedModel) -> list[str]:
    """sinkquant's own model files: the integer weights and scales, the config and the prefix KV."""
    save_file(_state(quantized), str(tmp / WEIGHTS))
    return [WEIGHTS, *_write_config_and_prefix(tmp, quantized)]


def _attach(tmp: Path, attachments: dict[str, str] | None) -> None:
    for name, text in (attachments or {}).items():
        if Path(name).name != name:
            raise SinkquantError(f"attachment {name!r} must be a plain file name")
        atomic_write_text(tmp / name, text)


def write_artifact(tmp: Path, quantized: QuantizedModel, extra: dict[str, Any] | None, weights: list[str]) -> None:
    """Everything but the weights, which are in `tmp` already (one file, or streaming's shards and index)."""
    quantized.base.tokenizer.save_pretrained(tmp)
    _write_manifest(tmp, quantized, extra, [*weights, *_write_config_and_prefix(tmp, quantized)])


def _write_config_and_prefix(tmp: Path, quantized: QuantizedModel) -> list[str]:
    quantized.model.config.save_pretrained(tmp)
    files = ["config.json"]
    if quantized.prefix is not None:
        save_file(_prefix_tensors(quantized.prefix), str(tmp / PREFIX))
        files.append(PREFIX)
    return files


def _write_manifest(tmp: Path, quantized: QuantizedModel, extra: dict[str, Any] | None, files: list[str]) -> None:
    resolved = quantized.recipe.resolved()
    atomic_write_text(tmp / RECIPE, yaml.safe_dump(resolved, sort_keys=False))
    base = quantized.base
    atomic_write_json(tmp / META, {
        "format_version": FORMAT_VERSION,
        "model": {"spec": base.spec, **base.source, "adapter": base.adapter.name},
        "recipe": resolved,
        "recipe_sha256": sha256_bytes(to_json(resolved).encode()),
        "files": file_digests(tmp, sorted({*files, RECIPE, *folder_files(tmp, META)})),  # every file: all verified
        "record": quantized.record,
        "versions": library_versions(),
        **(extra or {}),
    })


def _field(meta: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind):
        raise SinkquantError(f"{path}: field {key!r} is missing or not a {kind.__name__}; the manifest is damaged "
                             "(re-create the artifact with `sinkquant quantize`)")
    return value


def _verify(folder: Path, meta: dict[str, Any], meta_path: Path) -> None:
    recipe_digest = sha256_bytes(to_json(meta["recipe"]).encode())
    if meta.get("recipe_sha256") != recipe_digest:
        raise SinkquantError(f"{meta_path}: the recipe does not match its recorded sha256; the manifest was edited "
                             "(pass verify=False / --no-verify only if you know why)")
    verify_digests(folder, _field(meta, "files", dict, meta_path), str(folder))


def restore_quantized(name: str, module: QuantLinear, tensors: dict[str, torch.Tensor]) -> None:
    """One QuantLinear's integer weight and scales, popped from `tensors` (by `name`, as stored)."""
    spec = module.weights_spec
    if spec is not None:
        packed = tensors.pop(f"{name}.weight_packed", None)
        ints = tensors.pop(f"{name}.weight_int", None)
        try:
            values = QuantizedWeight.unpack(packed, spec.bits, spec.symmetric) if packed is not None else ints
            scale = tensors.pop(f"{name}.weight_scale")
            zero_point = tensors.pop(f"{name}.weight_zero_point")
        except KeyError as exc:
            raise SinkquantError(f"{WEIGHTS}: tensor {exc.args[0]!r} is missing") from None
        if values is None or tuple(values.shape) != (module.out_features, module.in_features):
            raise SinkquantError(f"{WEIGHTS}: the integer weight of {name} is missing or has the wrong shape "
                                 f"(expected {(module.out_features, module.in_features)})")
        module.set_qweight(QuantizedWeight(values, scale, zero_point, spec.bits, spec.granularity,
                                           spec.group_size, spec.symmetric))
    for buffer in ("act_scale", "act_zero_point"):
        if f"{name}.{buffer}" in tensors:
            setattr(module, buffer, tensors.pop(f"{name}.{buffer}"))


def _restore_weights(model: torch.nn.Module, session: Session, tensors: dict[str, torch.Tensor]) -> None:
    """Integer weights and scales into the QuantLinear layers, everything else by name."""
    for name, module in session.quantized.items():
        restore_quantized(name, module, tensors)
    for name, weight in embedding_weights(model).items():
        restore_embedding(tensors, name, tuple(weight.shape), WEIGHTS)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.endswith(QUANT_BUFFERS)]
    if model.config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise SinkquantError(f"{WEIGHTS}: {what}; the weights do not belong to this artifact's model")
    model.tie_weights()


def weight_files(folder: Path) -> list[Path]:
    """The artifact's weight files: `model.safetensors`, or the shards its index names (a streamed quantization)."""
    if (folder / WEIGHTS).is_file() or not (folder / WEIGHTS_INDEX).is_file():
        return [folder / WEIGHTS]
    index = read_structured(folder / WEIGHTS_INDEX, "weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
        raise SinkquantError(f"{folder / WEIGHTS_INDEX}: no valid weight_map; the artifact is damaged")
    return [folder / name for name in sorted(set(weight_map.values()))]


def read_artifact_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise SinkquantError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def open_manifest(folder: Path, verify: bool = True) -> tuple[dict[str, Any], Recipe]:
    """An artifact's manifest and recipe, every file in the folder listed in it (nothing unlisted is ever read)
    and, with `verify`, every file's sha256 checked: what `load` does before it reads any file, and what the CLI
    does before it reads the artifact's tokenizer."""
    meta_path = folder / META
    meta = read_manifest(folder, META, "it is not a sinkquant artifact; write one with `sinkquant quantize`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SinkquantError(f"{meta_path}: format_version {meta.get('format_version')!r}; this sinkquant reads "
                             f"{FORMAT_VERSION} (re-create the artifact with `sinkquant quantize`)")
    recipe = parse_recipe(_field(meta, "recipe", dict, meta_path), str(meta_path))
    check_listed(folder, meta.get("files"), META)
    if verify:
        _verify(folder, meta, meta_path)
    return meta, recipe


def load(folder: str | Path, verify: bool = True, stream: bool = False) -> QuantizedModel:
    """Reload an artifact written by `save` (or `sinkquant quantize`); `verify` checks every file's sha256.
    `stream`: leave the decoder layers on disk, read one at a time by each forward (engine/stream.py), for an
    artifact larger than memory."""
    folder = Path(folder)
    meta, recipe = open_manifest(folder, verify)
    meta_path = folder / META
    record = _field(meta, "record", dict, meta_path)
    model_meta = _field(meta, "model", dict, meta_path)
    backend = BACKENDS[recipe.backend]
    return backend.load_model(
        folder, lambda: _load_model(folder, recipe, record, model_meta, backend, stream),
        lambda model: QuantizedModel(base=_loaded(model, folder_tokenizer(folder), model_meta),
                                     model=model, recipe=recipe, prefix=None, record=record))


def _loaded(model: nn.Module, tokenizer: Any, model_meta: dict[str, Any]) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=model_meta.get("spec"),
                       source={k: v for k, v in model_meta.items() if k not in ("spec", "adapter")})


def _load_model(folder: Path, recipe: Recipe, record: dict[str, Any], model_meta: dict[str, Any], backend: Backend,
                stream: bool) -> QuantizedModel:
    """sinkquant's own model from its artifact: the quantized structure, the integer weights and scales, the
    prefix KV, each step's restore, then the backend's `finalize`."""
    meta_path = folder / META
    if not (folder / "config.json").is_file():
        raise SinkquantError(f"{folder / 'config.json'} is missing; the artifact is incomplete")
    tokenizer = folder_tokenizer(folder)
    if stream:
        refusal = streaming_refusal(recipe)
        if refusal is not None:
            raise SinkquantError(f"{folder}: this artifact cannot be streamed: {refusal}")
    model = normalize(skeleton(folder) if stream else empty_model(folder))
    base = _loaded(model, tokenizer, model_meta)
    keep = record.get("keep", {})
    session = Session(loaded=base, scheme=recipe.scheme, calibration=torch.empty(0, 0, dtype=torch.long),
                      keep=KeepPolicy(positions=tuple(keep.get("positions", ())),
                                      token_ids=tuple(keep.get("token_ids", ()))))
    records = record.get("steps", [])
    step_records = []
    for step in recipe.steps:
        step_record = next((r for r in records if isinstance(r, dict) and r.get("step") == step.name), None)
        if step_record is None:
            raise SinkquantError(f"{meta_path}: record has no entry for step {step.name!r}; the manifest is damaged")
        step.prepare_restore(session, step_record)
        step_records.append(step_record)
    quantize_structure(session, kv=backend.simulated_kv)  # else the backend's KV cache quantizes the KV
    layers = None
    if stream:
        layers = artifact_layers(folder, session)
    else:
        _restore_weights(model, session, read_artifact_weights(folder))
    prefix_record = next((r for s, r in zip(recipe.steps, step_records, strict=True) if s.name == "prefix"), None)
    if (folder / PREFIX).is_file() != (prefix_record is not None):
        raise SinkquantError(f"{folder / PREFIX} is {'present' if prefix_record is None else 'missing'}, but the "
                             f"recipe {'has no' if prefix_record is None else 'has a'} prefix step; the artifact is "
                             "damaged (re-create it with `sinkquant quantize`)")
    if prefix_record is not None:
        try:
            prefix_tensors = load_file(folder / PREFIX)
        except (SafetensorError, OSError) as exc:
            raise SinkquantError(f"{folder / PREFIX}: not a readable safetensors file ({exc})") from None
        session.prefix = _prefix_from(prefix_tensors, model.config, model_device(model))
        if session.prefix.ids != prefix_record.get("ids"):
            raise SinkquantError(f"{folder / PREFIX}: token ids {session.prefix.ids} differ from the prefix step's "
                                 f"record {prefix_record.get('ids')}; the artifact is damaged")
    for step, step_record in zip(recipe.steps, step_records, strict=True):
        step.restore(session, step_record)
    for name, module in session.quantized.items():  # after the steps: an exception layer has no static scale
        if module.activations is not None and module.activations.mode == "static" and module.act_scale is None:
            raise SinkquantError(f"{WEIGHTS}: the static activation scale of {name} is missing")
    backend.finalize(model, recipe.scheme)
    return QuantizedModel(base=base, model=model, recipe=recipe, prefix=session.prefix, record=record, layers=layers)


def artifact_layers(folder: Path, session: Session) -> LayerStream:
    """An artifact's tensors into the quantized skeleton of `session` (its QuantLinears in place): the final norm
    and every activation scale now (exceptions and checks read them), each decoder layer's integer weights when a
    forward reads it, embedding rows and lm_head slices as a forward needs them (int8 embeddings: now).
    Tensors keep their stored dtype (a bf16 model stays bf16)."""
    model = session.model
    files = checkpoint_index(folder, weight_files(folder))
    layer_names = f"{session.loaded.adapter.layers}."
    scales = [n for n in files if n.startswith(layer_names) and n.endswith(("act_scale", "act_zero_point"))]
    for name, tensor in read_tensors(files, scales, None).items():
        module_name, _, buffer = name.rpartition(".")
        setattr(model.get_submodule(module_name), buffer, tensor)
    model.tie_weights()  # a tied lm_head is stored once, under the input embedding's name
    embeddings = embedding_weights(model)
    # 16-bit or fp32 embeddings stay on disk like the layers (int8 ones are rebuilt from values and scales)
    on_disk = set(embeddings) if all(name in files for name in embeddings) else set()
    rest = read_tensors(files, [n for n in files if not n.startswith(layer_names) and n not in on_disk], None)
    for name, weight in embeddings.items():
        restore_embedding(rest, name, tuple(weight.shape), WEIGHTS)
    assign_tensors(model, rest, [n for n in model.state_dict() if not n.startswith(layer_names) and n not in on_disk],
                   folder)
    model.tie_weights()

    def read(index: int, layer: nn.Module) -> None:
        prefix = f"{layer_names}{index}."
        tensors = {n[len(prefix):]: t for n, t in read_tensors(
            files, [n for n in files if n.startswith(prefix) and n not in scales], None).items()}
        for name, module in layer.named_modules():
            if isinstance(module, QuantLinear):
                restore_quantized(name, module, tensors)
        assign_tensors(layer, tensors, [n for n, _ in tensor_slots(layer) if not n.endswith(QUANT_BUFFERS)], folder)

    layers = LayerStream(model, files, None, reader=read)
    if on_disk:
        layers.embeddings = leave_embeddings_on_disk(model, files)
    return layers
