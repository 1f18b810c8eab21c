"""QuaRot / SpinQuant-style rotation of a LoadedModel, exact in floating point.

An orthogonal Q on the residual stream leaves the model's function unchanged once every norm is made
rotation-invariant (its weight folded into the Linear layers that read it; for LayerNorm families the
residual made zero-mean first, SliceGPT-style, so the norm becomes an RMS norm), every reader becomes W Q,
every writer Q^T W, and the embeddings E Q. A Hadamard Q spreads the massive-activation channels over all
channels, so int4 grids stop being stretched by them. Three smaller rotations target other quantized
tensors: V/O per head (fused into v_proj and o_proj), an online Hadamard in front of down_proj (its
transpose fused into down_proj's weight), and one on Q/K per head after RoPE (`rotate_qk`, called by the
KV-quantizing attention), which leaves Q K^T unchanged.

Weight changes are saved with the model; the online transforms are not weights: `restore_rotation` rebuilds
them (and the module changes: RMS norms for LayerNorm families, lm_head's bias) from the record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from sinkquant.adapters import Adapter, adapter_for
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel, model_device
from sinkquant.quant.hadamard import orthogonal, rotation_kind


@dataclass(frozen=True)
class RotationRecord:
    """What `rotate` did, enough for `restore_rotation` to rebuild the online transforms bit for bit."""

    seed: int
    residual: int  # width of the residual rotation (0: none)
    residual_kind: str
    value_output: int  # head width of the V/O rotation (0: none)
    down_proj: int  # width of the online rotation in front of down_proj (0: none)
    down_proj_kind: str
    qk: int  # head width of the Q/K rotation (0: none)
    centered: bool  # LayerNorm family: norms replaced by RMS norms on a zero-mean residual
    post_norm_online: bool  # Gemma: the residual rotation runs online after each post-norm
    lm_head_bias: bool  # the final norm's bias was folded into a new lm_head bias

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RotationRecord:
        names = {f.name for f in fields(cls)}
        if set(record) != names:
            raise SinkquantError(f"rotation record has keys {sorted(record)}; valid: {sorted(names)}")
        return cls(**record)


class OnlineRotation(nn.Module):
    """x -> x R on the last dimension; R is rebuilt from the record, never saved (non-persistent buffer)."""

    def __init__(self, matrix: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix.to(device=device, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.matrix.to(x.dtype)).to(x.dtype)


class ResidualRMSNorm(nn.Module):
    """What a LayerNorm computes on a zero-mean residual, without the mean subtraction that a rotation
    breaks. Keeps LayerNorm's parameter names so saved state dicts load either way."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out


# Child module names of the online transforms. Hooks look them up on the module they run on, so a deep copy
# of a rotated model carries its own transforms.
QK_ATTRIBUTE = "qk_rotation"  # on each attention module, applied by `rotate_qk`
INPUT_ATTRIBUTE = "input_rotation"  # on down_proj, applied to its input by a forward pre-hook
OUTPUT_ATTRIBUTE = "output_rotation"  # on Gemma's post-norms, applied to their output by a forward hook


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_ATTRIBUTE)(args[0]), *args[1:])


def _rotate_output(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, OUTPUT_ATTRIBUTE)(output)


def rotate_qk(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each head of `query` [b, heads, s, d] and `key` [b, kv_heads, s, d] after RoPE, before K is
    quantized; Q K^T is unchanged. A no-op on attention modules that were not rotated."""
    rotation = getattr(module, QK_ATTRIBUTE, None)
    if rotation is None:
        return query, key
    return rotation(query), rotation(key)


def _heads(model: nn.Module) -> tuple[int, int, int]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _check_supported(model: nn.Module, adapter: Adapter) -> None:
    if not adapter.residual_writers or not adapter.embeddings:
        raise SinkquantError(f"rotation is not supported for architecture {adapter.name!r} (no rotation facts)")
    for key, value in adapter.rotation_requires:
        if getattr(model.config, key, None) != value:
            raise SinkquantError(f"rotation needs config {key}={value!r} for {adapter.name!r} models, "
                                 f"this one has {getattr(model.config, key, None)!r}")
    for path in adapter.rotation_forbids:
        parent, _, child = path.rpartition(".")
        if getattr(model.get_submodule(parent), child, None) is not None:
            raise SinkquantError(f"rotation cannot handle {path} (embedding width differs from the residual)")


def _untie(model: nn.Module, adapter: Adapter) -> None:
    """The embedding turns into E Q, lm_head into W Q (after the final norm's fold): they stop being equal."""
    head = model.get_submodule(adapter.lm_head)
    embed = model.get_submodule(adapter.embeddings[0])
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _norm_modules(model: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every norm on the residual stream, the final norm last."""
    found = []
    for layer in adapter.decoder_layers(model):
        for norm, _ in adapter.norm_readers:
            parent, _, child = norm.rpartition(".")
            found.append((layer.get_submodule(parent) if parent else layer, child))
    parent, _, child = adapter.final_norm.rpartition(".")
    found.append((model.get_submodule(parent), child))
    return found


def _to_rms_norms(model: nn.Module, adapter: Adapter) -> None:
    for parent, child in _norm_modules(model, adapter):
        norm = getattr(parent, child)
        if not isinstance(norm, ResidualRMSNorm):
            setattr(parent, child, ResidualRMSNorm(norm))


def _add_bias(linear: nn.Linear, value: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(value.to(linear.weight.dtype))
    else:
        linear.bias.add_(value.to(linear.bias.dtype))


def _center(model: nn.Module, adapter: Adapter) -> None:
    """Make every residual contribution zero-mean: LayerNorm's outputs do not change (it removes the mean)."""
    for path in adapter.embeddings:
        weight = model.get_submodule(path).weight
        weight.sub_(weight.mean(dim=1, keepdim=True))
    for layer in adapter.decoder_layers(model):
        for rel in adapter.residual_writers:
            writer = layer.get_submodule(rel)
            writer.weight.sub_(writer.weight.mean(dim=0, keepdim=True))
            if writer.bias is not None:
                writer.bias.sub_(writer.bias.mean())


def _fold(norm: nn.Module, readers: list[nn.Linear], offset: float) -> None:
    """reader(norm(x)) = (W diag(g)) n(x) + (W b + c): the norm keeps only its normalisation."""
    gain = norm.weight.detach().double() + offset
    bias = getattr(norm, "bias", None)
    for reader in readers:
        weight = reader.weight.detach().double()
        if bias is not None:
            _add_bias(reader, weight @ bias.detach().double())
        reader.weight.copy_(weight * gain[None, :])
    norm.weight.fill_(1.0 - offset)
    if bias is not None:
        bias.zero_()


def _rotate_in(linear: nn.Linear, q: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight.double() @ q.to(linear.weight.device))


def _rotate_out(linear: nn.Linear, q: torch.Tensor, rows: slice = slice(None)) -> None:
    q = q.to(linear.weight.device)
    linear.weight[rows] = (q.T @ linear.weight[rows].double()).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias[rows] = (linear.bias[rows].double() @ q).to(linear.bias.dtype)


def _attach_online(model: nn.Module, adapter: Adapter, record: RotationRecord) -> None:
    """Register the online transforms (idempotent): down_proj's input rotation, Q/K's, Gemma's post-norm one."""
    device = model_device(model)
    for layer in adapter.decoder_layers(model):
        down = layer.get_submodule(adapter.down_proj)
        if record.down_proj and not hasattr(down, INPUT_ATTRIBUTE):
            down.add_module(INPUT_ATTRIBUTE, OnlineRotation(
                orthogonal(record.down_proj, record.seed, random_signs=False), device))
            down.register_forward_pre_hook(_rotate_input)
        attention = layer.get_submodule(adapter.attention)
        if record.qk and not hasattr(attention, QK_ATTRIBUTE):
            attention.add_module(QK_ATTRIBUTE, OnlineRotation(
                orthogonal(record.qk, record.seed, random_signs=False), device))
        for name in adapter.post_norms if record.post_norm_online else ():
            norm = layer.get_submodule(name)
            if not hasattr(norm, OUTPUT_ATTRIBUTE):
                norm.add_module(OUTPUT_ATTRIBUTE, OnlineRotation(orthogonal(record.residual, record.seed), device))
                norm.register_forward_hook(_rotate_output)


@torch.no_grad()
def rotate(
    loaded_or_model: LoadedModel | nn.Module, seed: int = 0, residual: bool = True, value_output: bool = True,
    down_proj: bool = True, qk: bool = True,
) -> RotationRecord:
    """Rotate the model in place (fp32 or wider: the folds are exact only there) and return the record."""
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    adapter = adapter_for(model)
    _check_supported(model, adapter)
    if next(model.parameters()).dtype not in (torch.float32, torch.float64):
        raise SinkquantError(f"rotate needs an fp32 model, got {next(model.parameters()).dtype}; load it in fp32")
    heads, kv_heads, head_dim = _heads(model)
    hidden = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
    layers = adapter.decoder_layers(model)
    intermediate = layers[0].get_submodule(adapter.down_proj).in_features
    head = model.get_submodule(adapter.lm_head)
    final_norm = adapter.final_norm_module(model)
    lm_head_bias = residual and head.bias is None and getattr(final_norm, "bias", None) is not None
    record = RotationRecord(
        seed=seed, residual=hidden if residual else 0, residual_kind=rotation_kind(hidden) if residual else "",
        value_output=head_dim if value_output else 0, down_proj=intermediate if down_proj else 0,
        down_proj_kind=rotation_kind(intermediate) if down_proj else "", qk=head_dim if qk else 0,
        centered=residual and adapter.centered_norms, post_norm_online=residual and bool(adapter.post_norms),
        lm_head_bias=lm_head_bias,
    )
    if residual:
        _untie(model, adapter)
        if adapter.centered_norms:
            _center(model, adapter)
            _to_rms_norms(model, adapter)
        offset = adapter.norm_weight_offset
        for layer in layers:
            for norm, readers in adapter.norm_readers:
                _fold(layer.get_submodule(norm), [layer.get_submodule(r) for r in readers], offset)
        _fold(adapter.final_norm_module(model), [head], offset)
        q = orthogonal(hidden, seed)
        for path in adapter.embeddings:
            embedding = model.get_submodule(path)
            embedding.weight.copy_(embedding.weight.double() @ q.to(embedding.weight.device))
        _rotate_in(head, q)
        for layer in layers:
            for _, readers in adapter.norm_readers:
                for rel in readers:
                    _rotate_in(layer.get_submodule(rel), q)
            if not adapter.post_norms:
                for rel in adapter.residual_writers:
                    _rotate_out(layer.get_submodule(rel), q)
    if value_output:
        hv = orthogonal(head_dim, seed + 1)
        for layer in layers:
            v_proj, o_proj = layer.get_submodule(adapter.value_proj), layer.get_submodule(adapter.attn_out_proj)
            for rows in adapter.value_rows(kv_heads, head_dim):
                _rotate_out(v_proj, hv, rows)
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                o_proj.weight[:, cols] = (o_proj.weight[:, cols].double() @ hv.to(o_proj.weight.device)
                                          ).to(o_proj.weight.dtype)
    if down_proj:
        hd = orthogonal(intermediate, seed, random_signs=False)
        for layer in layers:
            _rotate_in(layer.get_submodule(adapter.down_proj), hd)
    _attach_online(model, adapter, record)
    return record


@torch.no_grad()
def restore_rotation(model: nn.Module, record: RotationRecord | dict[str, Any]) -> None:
    """On a freshly built model (from the config saved after rotation), redo what the saved weights do not
    hold: RMS norms for LayerNorm families, lm_head's bias, untied embeddings, and the online transforms.
    Call it before loading the saved state dict (weights loaded earlier are kept)."""
    record = record if isinstance(record, RotationRecord) else RotationRecord.from_dict(record)
    adapter = adapter_for(model)
    if record.residual:
        _untie(model, adapter)
    if record.centered:
        _to_rms_norms(model, adapter)
    head = model.get_submodule(adapter.lm_head)
    if record.lm_head_bias and head.bias is None:
        _add_bias(head, torch.zeros(head.out_features, device=head.weight.device))
    _attach_online(model, adapter, record)
