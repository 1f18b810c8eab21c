"""Export a native-backend model to the compressed-tensors layout that llm-compressor writes and vLLM loads.

The layout is produced by the `compressed-tensors` package itself (the path llm-compressor's save takes:
`apply_quantization_config`, then `ModelCompressor.compress_model`, `save_pretrained` and `update_config`), fed
with sinkquant's own integer grids: each quantized Linear's weight is the dequantized QuantizedWeight (which the
compressor rounds back to the same integers), `weight_scale` / `weight_zero_point` and `input_scale` /
`input_zero_point` are sinkquant's. Layers left in floating point (and lm_head) are `ignore`d; exception layers
of a W8A8 model (weight-only) become a second, weight-only config group. A rotated model's rotations become the
config's transform_config (sinkquant.backends.export.transforms: fused ones described, the online Hadamard before
down_proj stored and applied at load).

The fp prefix KV has no place in the format: it is written beside the model as `prefix_kv.safetensors`
(`layers.{i}.keys` / `layers.{i}.values`, [1, kv_heads, prefix_len, head_dim]) with its token ids in
`prefix.json`; `load_prefix_cache` turns it back into a transformers DynamicCache to pass as `past_key_values`,
with the prefix ids in front of the prompt (generate) or only the tokens after it (a plain forward)."""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from sinkquant.backends.export.transforms import expected_rotation, rotation_refusals, transform_config
from sinkquant.backends.native import UINT8_SHIFT, NativeLinear, native_copy
from sinkquant.backends.registry import BACKENDS
from sinkquant.errors import SinkquantError
from sinkquant.io import (
    atomic_dir,
    atomic_write_json,
    check_listed,
    file_digests,
    folder_files,
    library_versions,
    read_manifest,
    read_structured,
    recorded_digests,
    verify_digests,
)
from sinkquant.online_transforms import attach_online
from sinkquant.perplexity import Prefix
from sinkquant.quant.keep import detach_keep_state

if TYPE_CHECKING:
    from sinkquant.engine.apply import QuantizedModel
    from sinkquant.recipe import Recipe

PREFIX_KV = "prefix_kv.safetensors"
PREFIX_META = "prefix.json"
MANIFEST = "sinkquant_export.json"


def _weight_args(layer: NativeLinear) -> dict[str, Any]:
    strategy = {"tensor": "tensor", "channel": "channel", "group": "group"}[layer.granularity]
    args: dict[str, Any] = {"num_bits": layer.bits, "type": "int", "symmetric": layer.symmetric,
                            "strategy": strategy, "dynamic": False}
    if layer.granularity == "group":
        args["group_size"] = layer.group_size
    return args


def _input_args(layer: NativeLinear) -> dict[str, Any] | None:
    if layer.act_mode is None:
        return None
    strategy, dynamic = ("tensor", False) if layer.act_mode == "static" else ("token", True)
    return {"num_bits": layer.act_bits, "type": "int", "symmetric": layer.act_symmetric, "strategy": strategy,
            "dynamic": dynamic}


def _check_expressible(name: str, layer: NativeLinear, prefix_length: int) -> None:
    """Refuse what compressed-tensors (and vLLM's int kernels) cannot express, naming the part and why."""
    if layer.act_mode == "dynamic-tensor":
        raise SinkquantError(f"{name}: activations.mode='dynamic-tensor' cannot be exported to compressed-tensors "
                             "(vLLM's int8 kernels take static per-tensor or dynamic per-token activation scales)")
    if layer.act_mode is not None and (layer.act_bits != 8 or layer.bits != 8):
        raise SinkquantError(f"{name}: W{layer.bits}A{layer.act_bits} cannot be exported to compressed-tensors "
                             "(valid: W8A8 int8, W8A16, W4A16 group)")
    if layer.act_mode is not None and (not layer.symmetric or layer.granularity == "group"):
        raise SinkquantError(f"{name}: W8A8 with {'asymmetric' if not layer.symmetric else 'group-wise'} weights "
                             "cannot be exported (vLLM's int8 W8A8 kernels take symmetric per-tensor or per-channel "
                             "weights)")
    if layer.act_mode is None and layer.bits not in (4, 8):
        raise SinkquantError(f"{name}: {layer.bits}-bit weights cannot be exported (valid: 4 or 8 bits)")
    if layer.act_mode is None and not layer.symmetric:
        raise SinkquantError(f"{name}: asymmetric weight-only weights cannot be exported: pack-quantized packs their "
                             "zero points along the output rows, which transformers 5 + compressed-tensors 0.20 then "
                             "refuse to load (size mismatch); quantize weight-only layers symmetric")
    policy = getattr(layer.keep, "policy", None)
    if layer.act_mode is not None and policy is not None:
        outside = [p for p in policy.positions if p >= prefix_length]
        if outside or policy.token_ids:
            raise SinkquantError(
                f"{name}: keep (positions {outside or list(policy.positions)}, token ids {list(policy.token_ids)}) "
                "cannot be exported: compressed-tensors has no per-token full precision; only positions inside "
                f"the fp prefix ({prefix_length} tokens, written beside the model) are expressible")


def _quantization_config(layers: dict[str, NativeLinear], ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[str, list[str]] = defaultdict(list)
    schemes: dict[str, tuple[dict, dict | None]] = {}
    for name, layer in layers.items():
        weights, inputs = _weight_args(layer), _input_args(layer)
        key = json.dumps([weights, inputs], sort_keys=True)
        schemes[key] = (weights, inputs)
        groups[key].append(name)
    config_groups = {}
    for index, (key, names) in enumerate(groups.items()):
        weights, inputs = schemes[key]
        config_groups[f"group_{index}"] = QuantizationScheme(
            targets=[f"re:^{n.replace('.', '[.]')}$" for n in names],
            weights=QuantizationArgs(**weights),
            input_activations=None if inputs is None else QuantizationArgs(**inputs))
    return QuantizationConfig(config_groups=config_groups, ignore=ignore)


@torch.no_grad()
def _fill_parameters(module: nn.Module, layer: NativeLinear) -> None:
    """Put sinkquant's grids into the parameters compressed-tensors initialised on `module`."""
    weight_scale = module.weight_scale
    weight_scale.data.copy_(layer.weight_scale.reshape(weight_scale.shape))
    # compressed-tensors stores grids as signed integers; sinkquant's asymmetric 8-bit grid is uint8 [0, 255]
    shift = 0 if layer.symmetric else UINT8_SHIFT if layer.bits == 8 else 2 ** (layer.bits - 1)
    if hasattr(module, "weight_zero_point"):
        zero = (layer.weight_zero_point - shift).round().reshape(module.weight_zero_point.shape)
        module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
    if layer.act_mode == "static":
        module.input_scale.data.copy_(layer.act_scale.reshape(module.input_scale.shape))
        if hasattr(module, "input_zero_point"):
            zero = layer.act_zero_point - (0 if layer.act_symmetric else UINT8_SHIFT)
            module.input_zero_point.data.copy_(zero.round().reshape(module.input_zero_point.shape)
                                               .to(module.input_zero_point.dtype))


def export_compressed_tensors(
    model: nn.Module, tokenizer: Any, out: str | os.PathLike, prefix: Prefix | None = None,
    overwrite: bool = False, provenance: dict[str, Any] | None = None, rotation: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (its quantized layers NativeLinear) as a compressed-tensors folder, atomically; `rotation`
    (the rotate step's record) becomes its transform_config (sinkquant.backends.export.transforms)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    layers = {n: m for n, m in model.named_modules() if isinstance(m, NativeLinear)}
    if not layers:
        raise SinkquantError("model has no native quantized layers to export; convert it with the native backend first")
    prefix_length = len(prefix.ids) if prefix is not None and prefix.cache is not None else 0
    for name, layer in layers.items():
        _check_expressible(name, layer, prefix_length)
    if len({layer.bits for layer in layers.values()}) > 1:
        raise SinkquantError("mixed 4- and 8-bit weights cannot be exported in one compressed-tensors format "
                             "(one format per model: int-quantized or pack-quantized)")
    transforms, matrices = transform_config(model, rotation) if rotation else (None, {})
    plain = copy.deepcopy(model)
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data.copy_(layer.quantized_weight().dequantize())
        if layer.bias is not None:
            linear.bias.data.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, linear)
    detach_keep_state(plain)
    plain._forward_pre_hooks.clear()
    ignore = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    config = _quantization_config(layers, ignore)
    apply_quantization_config(plain, config, show_progress=False)
    for name, layer in layers.items():
        _fill_parameters(plain.get_submodule(name), layer)
    if transforms is not None:
        attach_online(plain, transforms, matrices)
    compressor = ModelCompressor.from_pretrained_model(plain)
    compressor.compress_model(plain)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        tokenizer.save_pretrained(tmp)
        if prefix is not None and prefix.cache is not None:
            _write_prefix(tmp, prefix)
        files = file_digests(tmp, folder_files(tmp, MANIFEST))  # every file: `verify_export` checks them all
        atomic_write_json(tmp / MANIFEST, {
            "format": "compressed-tensors", "layers": {n: layer.extra_repr() for n, layer in layers.items()},
            "ignored": ignore, "prefix_ids": list(prefix.ids) if prefix_length else [], "sha256": files,
            "versions": library_versions(), **(provenance or {}),
        })
    return Path(out)


def compressed_tensors_refusals(recipe: Recipe, model: nn.Module | None = None) -> list[str]:
    """The parts of a recipe compressed-tensors (as vLLM runs it) cannot express, one line each naming the part
    (empty: exportable), decided before quantizing; with `model`, its rotation too. Kept positions outside the
    prefix and mixed bit widths are checked at export, on the quantized layers."""
    refusals = BACKENDS[recipe.backend].export_refusals()
    scheme = recipe.scheme
    weights, acts = scheme.weights, scheme.activations
    if weights is None:
        refusals.append("scheme.weights missing: compressed-tensors stores quantized weights (valid: 4 or 8 bits)")
    elif acts is None and (weights.bits not in (4, 8) or not weights.symmetric):
        refusals.append(f"scheme.weights bits={weights.bits} symmetric={weights.symmetric}: weight-only layers "
                        "export as symmetric 4- or 8-bit (pack-quantized asymmetric zero points do not load)")
    if acts is not None and acts.mode == "dynamic-tensor":
        refusals.append("scheme.activations.mode='dynamic-tensor': vLLM's int8 kernels take static per-tensor or "
                        "dynamic per-token scales (valid: 'static', 'dynamic-token')")
    w8a8 = acts is not None and weights is not None and acts.bits == weights.bits == 8
    if acts is not None and weights is not None and not w8a8:
        refusals.append(f"W{weights.bits}A{acts.bits}: compressed-tensors' integer W*A* formats that vLLM runs are "
                        "W8A8 int8 (valid: W8A8, W8A16, W4A16 group)")
    if w8a8 and (not weights.symmetric or weights.granularity == "group"):
        refusals.append("W8A8 with asymmetric or group-wise weights: vLLM's int8 W8A8 kernels take symmetric "
                        "per-tensor or per-channel weights")
    if scheme.kv is not None:
        refusals.append("scheme.kv: its kv_cache_scheme has static per-tensor scales, sinkquant's KV is quantized "
                        "per token at run time (valid: no kv)")
    for step in recipe.steps:
        if step.name == "act":
            refusals.append("step 'act': its calibrated attention (scaling hidden sinks at run time) has no "
                            "compressed-tensors form")
        if step.name == "keep_sink" and acts is not None and not any(s.name == "prefix" for s in recipe.steps):
            refusals.append("step 'keep_sink': compressed-tensors has no per-token full precision; only positions "
                            "inside the fp prefix (a prefix step) are expressible")
        if step.name == "rotate" and model is not None:
            refusals.extend(f"step 'rotate': {reason}" for reason in
                            rotation_refusals(expected_rotation(model, step.config)))
    return refusals




def _write_prefix(folder: Path, prefix: Prefix) -> None:
    """The prefix KV and its token ids beside the model (the manifest records their sha256, which
    `load_prefix_cache` checks)."""
    tensors = {}
    for index, layer in enumerate(prefix.cache.layers):
        tensors[f"layers.{index}.keys"] = layer.keys.detach().contiguous()
        tensors[f"layers.{index}.values"] = layer.values.detach().contiguous()
    save_file(tensors, str(folder / PREFIX_KV))
    atomic_write_json(folder / PREFIX_META, {
        "token_ids": list(prefix.ids), "layers": len(prefix.cache.layers),
        "usage": "cache = sinkquant.backends.export.load_prefix_cache(folder, model.config); "
                 "model(input_ids=<tokens after the prefix>, past_key_values=cache) or "
                 "model.generate(<prefix ids + prompt ids>, past_key_values=cache)",
    })

def verify_export(folder: str | os.PathLike, manifest: dict[str, Any], verify: bool = True) -> None:
    """Before `sinkquant eval` reads an export folder: every file in it listed in its manifest (an unlisted one
    is refused, not read) and, with `verify`, each file's sha256 checked (weights, config and tokenizer
    included)."""
    digests = recorded_digests(folder, MANIFEST, manifest, "sha256", "config.json",
                               "so the export cannot be verified; export the artifact again")
    check_listed(folder, digests, MANIFEST)
    if verify:
        verify_digests(folder, digests, str(folder))


def export_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a folder written by `export`, None for any other folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SinkquantError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); re-export the folder") from exc
    if not isinstance(manifest, dict):
        raise SinkquantError(f"{path} is not a JSON object; re-export the folder")
    return manifest


def load_prefix_cache(folder: str | os.PathLike, config: Any) -> tuple[list[int], DynamicCache]:
    """The sidecar prefix as (token ids, DynamicCache), checked before use: the token ids (integers inside the
    vocabulary, as many as the KV holds), every tensor's shape, dtype and finiteness, and the sha256 and ids the
    export recorded in its manifest. Whatever is wrong is one error line naming the file and the field."""
    folder = Path(folder)
    meta_path, kv_path = folder / PREFIX_META, folder / PREFIX_KV
    if not meta_path.is_file() or not kv_path.is_file():
        raise SinkquantError(f"{folder} has no {PREFIX_META} + {PREFIX_KV}; it was exported without a prefix")
    meta = read_structured(meta_path, PREFIX_META)
    ids = meta.get("token_ids") if isinstance(meta, dict) else None
    if not isinstance(ids, list) or not ids or any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
        raise SinkquantError(f"{meta_path}: field 'token_ids' must be a non-empty list of integer token ids "
                             f"(got {str(ids)[:80]})")
    text = config.get_text_config(decoder=True)
    outside = next((i for i in ids if not 0 <= i < text.vocab_size), None)
    if outside is not None:
        raise SinkquantError(f"{meta_path}: field 'token_ids' holds {outside}, outside this model's vocabulary "
                             f"[0, {text.vocab_size})")
    try:
        tensors = load_file(str(kv_path))
    except (SafetensorError, OSError) as exc:
        raise SinkquantError(f"{kv_path}: not a readable safetensors file ({exc})") from None
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    expected = (1, heads, len(ids), head_dim)
    cache = DynamicCache(config=config)
    for index in range(text.num_hidden_layers):
        pair = []
        for part in ("keys", "values"):
            key = f"layers.{index}.{part}"
            tensor = tensors.get(key)
            if tensor is None or tuple(tensor.shape) != expected:
                got = "missing" if tensor is None else tuple(tensor.shape)
                raise SinkquantError(f"{kv_path}: tensor {key} is {got}, expected {expected} for this model "
                                     f"({len(ids)} prefix tokens in {PREFIX_META})")
            if not tensor.is_floating_point():
                raise SinkquantError(f"{kv_path}: tensor {key} is {tensor.dtype}; the prefix KV is floating point")
            if not torch.isfinite(tensor).all():
                raise SinkquantError(f"{kv_path}: tensor {key} holds NaN or infinite values")
            pair.append(tensor)
        if pair[0].dtype != pair[1].dtype or (index and pair[0].dtype != cache.layers[0].keys.dtype):
            raise SinkquantError(f"{kv_path}: tensors of layer {index} are {pair[0].dtype} / {pair[1].dtype}; every "
                                 "prefix tensor has one dtype")
        cache.update(*pair, index)
    layers = range(text.num_hidden_layers)
    extra = sorted(set(tensors) - {f"layers.{i}.{part}" for i in layers for part in ("keys", "values")})
    if extra:
        raise SinkquantError(f"{kv_path}: unexpected tensor {extra[0]!r}; it holds KV for another model")
    manifest = read_manifest(folder, MANIFEST, "it was not written by `sinkquant export`, so the prefix cannot be "
                             "verified")
    digests = recorded_digests(folder, MANIFEST, manifest, "sha256", PREFIX_KV,
                               "so the prefix cannot be verified; export the artifact again")
    verify_digests(folder, {n: d for n, d in digests.items() if n in (PREFIX_KV, PREFIX_META)}, str(folder))
    if manifest.get("prefix_ids") != ids:
        raise SinkquantError(f"{meta_path}: field 'token_ids' {ids} differs from the prefix_ids "
                             f"{manifest.get('prefix_ids')} that {MANIFEST} records")
    return ids, cache


def export_quantized(quantized: QuantizedModel, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """An engine-made model (native or simulated layers: the same integers) as a compressed-tensors folder with
    its fp prefix KV beside it; the QuantizedModel itself is left untouched."""
    recipe = quantized.recipe
    rotation = quantized.step_record("rotate")
    refusals = [*compressed_tensors_refusals(recipe), *(f"step 'rotate': {r}" for r in rotation_refusals(rotation))]
    if refusals:
        raise SinkquantError(f"recipe {recipe.name!r} cannot be exported to compressed-tensors: {'; '.join(refusals)}")
    model = native_copy(quantized.model)
    return export_compressed_tensors(model, quantized.base.tokenizer, out, prefix=quantized.prefix,
                                     overwrite=overwrite, provenance={"recipe": recipe.resolved(),
                                                                      "model": quantized.base.spec},
                                     rotation=rotation)
