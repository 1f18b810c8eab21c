"""The rotate step's rotations as compressed-tensors transforms (the `transform_config` in the export's
quantization_config), named after SpinQuant's rotations as llm-compressor writes them:

    R1  residual rotation, fused: weight_output of the embeddings and of every residual writer (o_proj,
        down_proj), weight_input (inverse) of every reader (q/k/v, gate/up, lm_head). "random-hadamard"
        (a Hadamard matrix with QuaRot's random sign flips), "random-matrix" where the width has none.
    R2  per-head V/O rotation, fused: weight_output of v_proj, weight_input (inverse) of o_proj, head_dim blocks.
    R4  Hadamard before down_proj: online at down_proj's `input`, its inverse fused (weight_input). "hadamard"
        (Sylvester, which vLLM runs with its fast Walsh-Hadamard kernel) for powers of two, "random-hadamard"
        with the matrix stored in the checkpoint otherwise (e.g. 1536 = 12 x 128: Paley x Sylvester), which
        vLLM and compressed-tensors apply as a dense x H / sqrt(n).

The fused transforms are already in the stored weights (their entries only describe them, as llm-compressor's
do; vLLM applies online locations only). The Q/K rotation (SpinQuant's R3) is left out: it only matters in
front of a quantized KV cache, which the export refuses, and Q K^T is the same without it.

Loading them back (transformers 5 drops `transform_config`) is sinkquant/online_transforms.py."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from sinkquant.adapters import adapter_for
from sinkquant.errors import SinkquantError
from sinkquant.quant.hadamard import hadamard, orthogonal, sylvester

RESIDUAL, HEAD, DOWN = "R1", "R2", "R4"


def rotation_refusals(record: dict[str, Any] | None) -> list[str]:
    """What of a rotation compressed-tensors (as vLLM runs it) cannot express, each with its reason."""
    if not record:
        return []
    refusals = []
    if record.get("centered"):
        refusals.append("LayerNorms turned into RMS norms (the rotated residual loses its mean subtraction): the "
                        "exported config would load LayerNorms again")
    if record.get("lm_head_bias"):
        refusals.append("lm_head bias (the final LayerNorm's bias folded into it): the architecture's lm_head has "
                        "no bias to load it into")
    if record.get("post_norm_online"):
        refusals.append("online rotation after the post-norms (Gemma): a runtime applies online transforms at a "
                        "Linear's input or output only, and these sit between the norm and the residual add")
    if record.get("down_proj") and hadamard(record["down_proj"]) is None:
        refusals.append(f"online rotation before down_proj of width {record['down_proj']} (no Hadamard "
                        "construction: a random orthogonal matrix, which the runtimes' x H / sqrt(n) cannot apply)")
    return refusals


def expected_rotation(model: nn.Module, config: Any) -> dict[str, Any]:
    """The parts of a rotation record that decide its refusals, from the model and a RotateConfig, before rotating."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    head = model.get_submodule(adapter.lm_head)
    final_bias = getattr(adapter.final_norm_module(model), "bias", None)
    residual = bool(config.residual)
    return {"centered": residual and adapter.centered_norms, "post_norm_online": residual and bool(adapter.post_norms),
            "lm_head_bias": residual and head.bias is None and final_bias is not None,
            "down_proj": layers[0].get_submodule(adapter.down_proj).in_features if config.down_proj else 0}


def _exact(names: list[str]) -> list[str]:
    return [f"re:^{re.escape(name)}$" for name in names]


def _args(targets: list[str], location: str, inverse: bool = False) -> dict[str, Any]:
    return {"targets": targets, "location": location, "inverse": inverse}


def transform_config(model: nn.Module, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(transform_config as a dict, {scheme: matrix}) for a model rotated by `record`; the matrices are the
    unnormalised Hadamard matrices the online transforms store (the runtime divides by sqrt(n))."""
    refusals = rotation_refusals(record)
    if refusals:
        raise SinkquantError(f"the rotate step's {'; '.join(refusals)} cannot be expressed in compressed-tensors")
    adapter = adapter_for(model)
    layers = [f"{adapter.layers}.{i}" for i in range(len(adapter.decoder_layers(model)))]

    def each(rel: str) -> list[str]:
        return [f"{layer}.{rel}" for layer in layers]

    groups: dict[str, Any] = {}
    matrices: dict[str, torch.Tensor] = {}
    if record["residual"]:
        readers = [name for _, rels in adapter.norm_readers for rel in rels for name in each(rel)]
        writers = [name for rel in adapter.residual_writers for name in each(rel)]
        groups[RESIDUAL] = {
            "type": "random-hadamard" if hadamard(record["residual"]) is not None else "random-matrix",
            "apply": [_args(_exact([*adapter.embeddings, *writers]), "weight_output"),
                      _args(_exact([*readers, adapter.lm_head]), "weight_input", inverse=True)]}
    if record["value_output"]:
        groups[HEAD] = {
            "type": "random-hadamard" if hadamard(record["value_output"]) is not None else "random-matrix",
            "head_dim": record["value_output"],
            "apply": [_args(_exact(each(adapter.value_proj)), "weight_output"),
                      _args(_exact(each(adapter.attn_out_proj)), "weight_input", inverse=True)]}
    if record["down_proj"]:
        width = record["down_proj"]
        power_of_two = width & (width - 1) == 0
        targets = _exact(each(adapter.down_proj))
        groups[DOWN] = {"type": "hadamard" if power_of_two else "random-hadamard",
                        "apply": [_args(targets, "input"), _args(targets, "weight_input", inverse=True)]}
        matrices[DOWN] = sylvester(width) if power_of_two else hadamard(width)
        # The matrix the rotate step fused (x -> x H / sqrt(n)), bit for bit what the runtime will apply.
        assert torch.equal(matrices[DOWN] / width ** 0.5, orthogonal(width, record["seed"], random_signs=False))
    return {"config_groups": groups}, matrices








