"""compressed-tensors' online transforms on a loaded model: what vLLM does with a folder's `transform_config` and
transformers 5 does not (it drops the config). `load_model` attaches them to a compressed-tensors folder with
rotations (backends/export/transforms.py writes them); fused transforms are already in the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from sinkquant.errors import SinkquantError

ONLINE_LOCATIONS = ("input", "output")


def _online_only(config: dict[str, Any]) -> dict[str, Any]:
    groups = {}
    for name, scheme in config.get("config_groups", {}).items():
        online = [a for a in scheme.get("apply", []) if a.get("location") in ONLINE_LOCATIONS]
        if online:
            groups[name] = {**scheme, "apply": online}
    return {"config_groups": groups}


def attach_online(model: nn.Module, config: dict[str, Any], matrices: dict[str, torch.Tensor]) -> list[str]:
    """compressed-tensors' own online transforms (hooks and submodules `<scheme>_<location>`) on `model`, with
    `matrices` as their weights; returns the schemes attached. The fused entries are not applied again."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase

    online = _online_only(config)
    if not online["config_groups"]:
        return []
    apply_transform_config(model, TransformConfig.model_validate(online))
    missing = set(online["config_groups"])
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, TransformBase):
                continue
            scheme = name.rpartition(".")[2].rsplit("_", 1)[0]
            matrix = matrices.get(scheme)
            if matrix is None or tuple(matrix.shape) != tuple(module.weight.shape):
                got = "missing" if matrix is None else tuple(matrix.shape)
                raise SinkquantError(f"transform {name}: its matrix is {got}, expected {tuple(module.weight.shape)}")
            module.weight.copy_(matrix.to(module.weight.dtype))
            missing.discard(scheme)
    if missing:
        raise SinkquantError(f"transform_config schemes {sorted(missing)} match no module of this model")
    model.transform_config = TransformConfig.model_validate(config)
    return sorted(online["config_groups"])


def saved_transform_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's compressed-tensors transform_config, None where it has none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    quantization = json.loads(path.read_text()).get("quantization_config") or {}
    config = quantization.get("transform_config") if isinstance(quantization, dict) else None
    return config or None


def attach_saved_transforms(model: nn.Module, folder: str | Path) -> list[str]:
    """What vLLM does with a compressed-tensors folder's transform_config and transformers 5 does not: its online
    transforms, with the matrices stored in the checkpoint. Returns the schemes attached (none: nothing to do)."""
    config = saved_transform_config(folder)
    online = _online_only(config or {})
    if not online["config_groups"]:
        return []
    wanted = {f"{name}_{args['location']}" for name, scheme in online["config_groups"].items()
              for args in scheme["apply"]}
    matrices: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in wanted:
                    matrices.setdefault(parts[-2].rsplit("_", 1)[0], handle.get_tensor(key))
    return attach_online(model, config, matrices)
