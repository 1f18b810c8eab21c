"""A quantized model on disk: weights (safetensors, or the backend's own format), activation scales, the prefix
KV, the resolved recipe, what each step did, versions and data hashes. Written atomically; `load` reverses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import AutoTokenizer, DynamicCache

from sinkquant.adapters import adapter_for, normalize
from sinkquant.artifacts import atomic_dir, atomic_write_json, atomic_write_text, library_versions, read_manifest
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel, empty_model
from sinkquant.perplexity import Prefix
from sinkquant.quant import KeepPolicy, quantize_model
from sinkquant.quant.backends import load_backend, save_backend
from sinkquant.recipes.apply import QuantizedModel, release_activations
from sinkquant.recipes.schema import parse_recipe

FORMAT_VERSION = 1
META = "sinkquant.json"


def _prefix_tensors(prefix: Prefix) -> dict[str, torch.Tensor]:
    tensors = {"ids": torch.tensor(prefix.ids, dtype=torch.long)}
    for index, layer in enumerate(prefix.cache.layers):
        tensors[f"layers.{index}.keys"] = layer.keys.contiguous()
        tensors[f"layers.{index}.values"] = layer.values.contiguous()
    return tensors


def _prefix_from(tensors: dict[str, torch.Tensor], config) -> Prefix:
    cache = DynamicCache(config=config)
    index = 0
    while f"layers.{index}.keys" in tensors:
        cache.update(tensors[f"layers.{index}.keys"], tensors[f"layers.{index}.values"], index)
        index += 1
    return Prefix(ids=tensors["ids"].tolist(), cache=cache)


def save(quantized: QuantizedModel, out: str | Path, extra: dict[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Everything needed to reload and re-evaluate, nothing machine-specific in the recipe."""
    base = quantized.base
    with atomic_dir(out, overwrite=overwrite) as tmp:
        base.tokenizer.save_pretrained(tmp)
        if quantized.recipe.backend == "simulated":
            quantized.model.config.save_pretrained(tmp)
            save_model(quantized.model, str(tmp / "model.safetensors"))
            if quantized.prefix is not None:
                save_file(_prefix_tensors(quantized.prefix), str(tmp / "prefix.safetensors"))
        else:
            save_backend(quantized.model, quantized.recipe.backend, tmp / "backend")
        atomic_write_text(tmp / "recipe.yaml", yaml.safe_dump(quantized.recipe.resolved(), sort_keys=False))
        atomic_write_json(tmp / META, {
            "format_version": FORMAT_VERSION,
            "model": {"spec": base.spec, **base.source, "adapter": base.adapter.name},
            "recipe": quantized.recipe.resolved(),
            "record": quantized.record,
            "versions": library_versions(),
            **(extra or {}),
        })
    return Path(out)


def load(folder: str | Path) -> QuantizedModel:
    """Reload an artifact written by `save` (or `sinkquant quantize`)."""
    folder = Path(folder)
    meta_path = folder / META
    meta = read_manifest(folder, META, "it is not a sinkquant artifact; write one with `sinkquant quantize`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SinkquantError(f"{meta_path}: format_version {meta.get('format_version')!r}; this sinkquant reads "
                             f"{FORMAT_VERSION}")
    recipe = parse_recipe(meta["recipe"], str(meta_path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prefix = None
    if recipe.backend == "simulated":
        model = normalize(empty_model(folder))
        if (folder / "prefix.safetensors").is_file():
            prefix = _prefix_from(load_file(folder / "prefix.safetensors"), model.config)
        keep = KeepPolicy(**meta["record"]["keep"])
        quantize_model(model, adapter_for(model), recipe.quant_scheme(keep), restore=True)
        load_model(model, str(folder / "model.safetensors"))
        release_activations(model, meta["record"].get("exceptions", []))
    else:
        model = load_backend(folder / "backend")
    adapter = adapter_for(model)
    base = LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=meta["model"]["spec"],
                       source={k: v for k, v in meta["model"].items() if k not in ("spec", "adapter")})
    return QuantizedModel(base=base, model=model, recipe=recipe, prefix=prefix, record=meta["record"])
