"""Every architecture-specific fact lives here: where the decoder layers, attention, MLP, norms and Linear
layers sit. The rest of sinkquant asks an `Adapter` and never branches on the model type itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sinkquant.errors import SinkquantError


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family, relative to the CausalLM (layers) or to one layer."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    attention: str
    linears: tuple[str, ...]
    # The MLP's output projection: PrefixQuant counts outlier tokens at its input (the widest in practice).
    down_proj: str
    # (source, Linear layers that read the source's output): where SmoothQuant-style scales can migrate. The
    # source is a norm, or a Linear whose output reaches the targets through an elementwise product only
    # (Llama's up_proj -> down_proj: down(act(gate(x)) * up(x))), so the migration is exact in full precision.
    smooth_groups: tuple[tuple[str, tuple[str, ...]], ...]
    # Gemma's RMSNorm multiplies by (1 + weight); migration must scale (offset + weight).
    norm_weight_offset: float = 0.0
    # Rotation facts (quant/rotation.py). Embedding modules (CausalLM-relative) whose rows enter the residual.
    embeddings: tuple[str, ...] = ()
    lm_head: str = "lm_head"
    # (norm, Linear layers that read its output) for every norm on the residual stream inside a layer.
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Linear layers whose output is added to the residual stream.
    residual_writers: tuple[str, ...] = ()
    # Norms applied to a writer's output before the residual add (Gemma's post-norms): the writer keeps its
    # output basis and the rotation runs online after the norm.
    post_norms: tuple[str, ...] = ()
    # LayerNorm family: the norm subtracts the mean, so the residual is made zero-mean before rotating.
    centered_norms: bool = False
    # The Linear holding V and the attention output projection; where V's rows sit in it: "separate" (its
    # own v_proj), "concat" ([Q; K; V] blocks, GPT-2's c_attn), "per_head" ([q_h, k_h, v_h] per head, GPT-NeoX).
    value_proj: str = ""
    attn_out_proj: str = ""
    qkv_layout: str = "separate"
    # Config values a rotation needs (OPT's post-LayerNorm variant cannot be rotated) and modules that must
    # be absent (OPT's project_in / project_out between embedding and residual widths).
    rotation_requires: tuple[tuple[str, object], ...] = ()
    rotation_forbids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.down_proj not in self.linears:
            raise ValueError(f"adapter {self.name}: down_proj {self.down_proj!r} is not one of its linears")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(self.attention) for layer in self.decoder_layers(model)]

    def linear_layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every quantizable Linear of the decoder, by full module name, in forward order."""
        found: dict[str, nn.Linear] = {}
        for index, layer in enumerate(self.decoder_layers(model)):
            for rel in self.linears:
                module = layer.get_submodule(rel)
                if not isinstance(module, nn.Linear):
                    raise SinkquantError(
                        f"{self.layers}.{index}.{rel} is {type(module).__name__}, expected nn.Linear; "
                        "call sinkquant.adapters.normalize(model) first"
                    )
                found[f"{self.layers}.{index}.{rel}"] = module
        return found

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def value_rows(self, kv_heads: int, head_dim: int) -> list[slice]:
        """The rows of `value_proj`'s weight that produce each KV head's values."""
        if self.qkv_layout == "separate":
            return [slice(h * head_dim, (h + 1) * head_dim) for h in range(kv_heads)]
        if self.qkv_layout == "concat":
            base = 2 * kv_heads * head_dim
            return [slice(base + h * head_dim, base + (h + 1) * head_dim) for h in range(kv_heads)]
        return [slice((3 * h + 2) * head_dim, (3 * h + 3) * head_dim) for h in range(kv_heads)]


_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
_LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        layers="model.layers",
        final_norm="model.norm",
        attention="self_attn",
        linears=_LLAMA_LINEARS,
        down_proj="mlp.down_proj",
        smooth_groups=_LLAMA_GROUPS,
        embeddings=("model.embed_tokens",),
        norm_readers=_LLAMA_GROUPS[:2],
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        value_proj="self_attn.v_proj",
        attn_out_proj="self_attn.o_proj",
    ),
    Adapter(
        name="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        layers="model.layers",
        final_norm="model.norm",
        attention="self_attn",
        linears=_LLAMA_LINEARS,
        down_proj="mlp.down_proj",
        smooth_groups=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("mlp.up_proj", ("mlp.down_proj",)),
        ),
        norm_weight_offset=1.0,
        embeddings=("model.embed_tokens",),
        norm_readers=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        value_proj="self_attn.v_proj",
        attn_out_proj="self_attn.o_proj",
    ),
    Adapter(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        final_norm="transformer.ln_f",
        attention="attn",
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        down_proj="mlp.c_proj",
        smooth_groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        embeddings=("transformer.wte", "transformer.wpe"),
        norm_readers=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        residual_writers=("attn.c_proj", "mlp.c_proj"),
        centered_norms=True,
        value_proj="attn.c_attn",
        attn_out_proj="attn.c_proj",
        qkv_layout="concat",
    ),
    Adapter(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        attention="self_attn",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        down_proj="fc2",
        smooth_groups=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        norm_readers=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
        residual_writers=("self_attn.out_proj", "fc2"),
        centered_norms=True,
        value_proj="self_attn.v_proj",
        attn_out_proj="self_attn.out_proj",
        rotation_requires=(("do_layer_norm_before", True),),
        rotation_forbids=("model.decoder.project_in", "model.decoder.project_out"),
    ),
    Adapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        attention="attention",
        linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        down_proj="mlp.dense_4h_to_h",
        smooth_groups=(
            ("input_layernorm", ("attention.query_key_value",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
        embeddings=("gpt_neox.embed_in",),
        norm_readers=(
            ("input_layernorm", ("attention.query_key_value",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
        residual_writers=("attention.dense", "mlp.dense_4h_to_h"),
        centered_norms=True,
        value_proj="attention.query_key_value",
        attn_out_proj="attention.dense",
        qkv_layout="per_head",
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config: nn.Module | object) -> Adapter:
    """The adapter for a model (or its config); a clear error lists what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise SinkquantError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None)
    linear = linear.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def normalize(model: nn.Module) -> nn.Module:
    """Replace GPT-2 style Conv1D by the equivalent nn.Linear so every later step sees one layer type."""
    adapter = adapter_for(model)
    for layer in adapter.decoder_layers(model):
        for rel in adapter.linears:
            module = layer.get_submodule(rel)
            if isinstance(module, Conv1D):
                parent_name, _, child = rel.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, _linear_from_conv1d(module))
    return model
