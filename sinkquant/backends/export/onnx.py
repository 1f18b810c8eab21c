"""Export a quantized model as one ONNX graph that ONNX Runtime's CPU execution provider runs with int8 kernels,
carrying sinkquant's own integers and static scales (no re-calibration by ONNX Runtime).

The decoder graph is built here with `onnx.helper` from the adapter's facts and the model's own modules, not traced:
every quantized Linear is written as QuantizeLinear -> DequantizeLinear on its input (sinkquant's static scale and
zero point) and an int8 per-output-channel initializer -> DequantizeLinear on its weight, feeding a MatMul, the
QDQ form ONNX Runtime fuses into integer kernels (MatMulIntegerToFloat / QLinearMatMul). Norms, attention, RoPE
and the layers the recipe keeps in float stay float; weight-only layers (exceptions, the int8 lm_head) run their
int8 weight against the activations split into int8 limbs (a decode step) or dequantized per call (a prompt);
the int8 embedding stays int8 rows behind a Gather. Online transforms of the rotate step become MatMuls by
their matrices (down_proj's input Hadamard, Gemma's post-norm rotation); the Q/K rotation leaves Q K^T
unchanged in float (KV quantization, which it serves, is refused) and is not written.

Inputs: `input_ids` [batch, seq], `attention_mask` [batch, past + seq] (all ones), `past_key_values.{i}.key` /
`.value` [batch, kv_heads, past or a longer buffer, head_dim] and `logits_to_keep` (int64 scalar, 0: all
positions); outputs `logits` [batch, seq or logits_to_keep, vocab] and `present.{i}.key` / `.value` (which may be
bound to the past's buffer: GroupQueryAttention then writes the new KV in place). Positions are past + 0..seq-1,
the past's length read from the mask, so the fp prefix KV (written beside the graph as `prefix_kv.npz`, keyed by
the input names) is fed as the first past and the prompt runs after it exactly as in sinkquant. No padding: rows
of a batch are unpadded and equally long."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sinkquant.adapters import adapter_for
from sinkquant.backends.native import INT8_HEAD_MAX_ROWS, LIMBS, UINT8_SHIFT, NativeLinear, native_copy
from sinkquant.backends.registry import BACKENDS
from sinkquant.errors import SinkquantError
from sinkquant.io import atomic_dir, atomic_write_json, file_digests, folder_files, library_versions
from sinkquant.quant.embeddings import int8_rows
from sinkquant.quant.keep import keep_state
from sinkquant.quant.primitives import MIN_SCALE
from sinkquant.quant.qweight import QuantizedWeight
from sinkquant.quant.rotation import INPUT_ATTRIBUTE, OUTPUT_ATTRIBUTE
from sinkquant.recipe import Recipe, parse_recipe

if TYPE_CHECKING:
    from sinkquant.engine.apply import QuantizedModel

ONNX_MANIFEST = "sinkquant_onnx.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PREFIX_FILE = "prefix_kv.npz"
LOGITS_TO_KEEP = "logits_to_keep"
ATTENTION_MASK = "attention_mask"
OPSET = 21
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def onnx_refusals(recipe: Recipe | dict[str, Any]) -> list[str]:
    """The parts of a recipe the ONNX export cannot express, one line each naming the part (empty: exportable).
    Model-dependent parts (the architecture, kept positions outside the prefix) are checked at export."""
    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe, "recipe")
    refusals = BACKENDS[recipe.backend].export_refusals()
    scheme = recipe.scheme
    weights, acts = scheme.weights, scheme.activations
    if weights is not None and weights.bits != 8:
        refusals.append(f"scheme.weights.bits={weights.bits}: ONNX Runtime's CPU integer kernels take 8-bit weights "
                        "(valid: 8)")
    if weights is not None and weights.granularity == "group":
        refusals.append("scheme.weights.granularity='group': DequantizeLinear blocks feed no integer MatMul kernel "
                        "(valid: 'channel' or 'tensor')")
    if weights is not None and not weights.symmetric:
        refusals.append("scheme.weights.symmetric=false: the int8 QDQ MatMul fusion takes symmetric int8 weights "
                        "(valid: true)")
    if acts is not None and acts.mode != "static":
        refusals.append(f"scheme.activations.mode={acts.mode!r}: ONNX has no per-token dynamic quantization and its "
                        "DynamicQuantizeLinear uses another grid (valid: 'static')")
    if acts is not None and acts.bits != 8:
        refusals.append(f"scheme.activations.bits={acts.bits}: ONNX Runtime's integer MatMuls take 8-bit "
                        "activations (valid: 8)")
    if scheme.kv is not None:
        refusals.append("scheme.kv: sinkquant quantizes the KV cache per token at run time; ONNX Runtime's "
                        "attention has no such cache (valid: no kv)")
    if scheme.embeddings is not None and scheme.embeddings.dtype not in ("int8", "float32"):
        refusals.append(f"scheme.embeddings.dtype={scheme.embeddings.dtype!r}: the export writes int8 rows or "
                        "float32 (valid: 'int8')")
    for step in recipe.steps:
        if step.name == "act":
            refusals.append("step 'act': its calibrated attention (scaling hidden sinks at run time) is not an ONNX "
                            "operator")
        if step.name == "keep_sink":
            refusals.append("step 'keep_sink': rows kept in full precision outside the fp prefix need per-token "
                            "float rows in every quantized MatMul, which the QDQ graph cannot express")
    return refusals


class _Graph:
    """Nodes and initializers under construction, with unique names and shared scalar constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []  # types ONNX's own shape inference cannot derive
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(self.name("const"), array)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, name: str | None = None,
           domain: str | None = None, **attrs: Any) -> Any:
        node_name = name or self.name(op_type)
        names = outputs if isinstance(outputs, list) else [f"{node_name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=node_name, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def _array(tensor: torch.Tensor, dtype: Any = np.float32) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(dtype)


class _Builder:
    """One decoder graph from a model whose quantized layers are NativeLinear (or float Linear)."""

    def __init__(self, model: nn.Module, int8_embeddings: bool) -> None:
        self.model, self.config = model, model.config.get_text_config(decoder=True)
        self.adapter = adapter_for(model)
        self.int8_embeddings = int8_embeddings
        self.g = _Graph()
        self.quantized_layers: list[str] = []
        self.weight_only_layers: list[str] = []
        self.float_layers: list[str] = []
        config = self.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.activation = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
        self.max_positions = config.max_position_embeddings
        self.rope_tables: dict[str, tuple[str, str]] = {}  # RoPE table prefix -> (cos, sin) initializer names

    # --- layers -------------------------------------------------------------------------------------------
    def linear(self, x: str, module: nn.Module, name: str) -> str:
        g = self.g
        rotation = getattr(module, INPUT_ATTRIBUTE, None)
        if rotation is not None:
            x = g.op("MatMul", [x, g.tensor(f"{name}.input_rotation", _array(rotation.matrix))])
        if isinstance(module, NativeLinear):
            y = self._native(x, module, name)
        elif isinstance(module, nn.Linear) and type(module).__name__ == "Int8Head":
            y = self._weight_only(x, int8_rows(module.weight.detach().float()), name)
            self.weight_only_layers.append(name)
        elif isinstance(module, nn.Linear):
            y = g.op("MatMul", [x, g.tensor(f"{name}.weight_t", _array(module.weight.t()))])
            self.float_layers.append(name)
        else:
            raise SinkquantError(f"{name} is {type(module).__name__}; the ONNX export writes nn.Linear and the "
                                 "native backend's NativeLinear")
        bias = getattr(module, "bias", None)
        if bias is not None:
            y = g.op("Add", [y, g.tensor(f"{name}.bias", _array(bias))])
        return y

    def _weight(self, qweight: QuantizedWeight, name: str) -> str:
        """DequantizeLinear of the int8 weight, transposed to [in, out] with one scale per output (axis 1)."""
        g = self.g
        values = g.tensor(f"{name}.weight_int8_t", _array(qweight.qweight.t(), np.int8))
        scale = qweight.scale.reshape(-1)
        if scale.numel() == 1:
            return g.op("DequantizeLinear", [values, g.tensor(f"{name}.weight_scale", _array(scale[0]))])
        zero = g.tensor(f"{name}.weight_zero_point", np.zeros(scale.numel(), np.int8))
        return g.op("DequantizeLinear", [values, g.tensor(f"{name}.weight_scale", _array(scale)), zero], axis=1)

    def _weight_only(self, x: str, qweight: QuantizedWeight, name: str) -> str:
        """Float activations against the int8 weight (exception layers, the int8 lm_head), stored as uint8 with zero
        point 128. Up to INT8_HEAD_MAX_ROWS rows (a decode step, a prefill's last logits) as the native backend's
        `limb_matmul`: the activations as LIMBS int8 limbs per row, each the rounding residual of the one before,
        in one integer MatMul, the limbs' scales and the weight's row scales applied after (u8 x u8: ONNX
        Runtime's kernels widen to 16 bits before multiplying, so full-range limbs cannot saturate on AVX2 as u8 x
        s8 pairs can). Beyond that (a prompt, a perplexity window) a float MatMul on the grid's values, dequantized
        per call: the same numbers to float rounding, and ONNX Runtime's u8 x u8 GEMM is slower than its float
        one at hundreds of rows. ONNX Runtime's own weight-only form, a weight DequantizeLinear -> MatMul, is
        fused into MatMulNBits at accuracy level 4 (int8 activations per 32 values), which the exception layers'
        massive activations do not survive; its float32-compute 8-bit MatMulNBits ran ~0.9 s per decode step."""
        g = self.g
        weight, rowscale = self._uint8_weight(qweight, name)
        in_features = qweight.qweight.shape[1]
        many = g.op("Greater", [g.op("Size", [x]), g.const(INT8_HEAD_MAX_ROWS * in_features, np.int64)])

        def grid() -> str:
            values = g.op("Sub", [g.op("Cast", [weight], to=TensorProto.FLOAT), g.const(float(UINT8_SHIFT))])
            return g.op("MatMul", [x, g.op("Mul", [values, rowscale])])

        return g.op("If", [many], then_branch=self._branch(grid), else_branch=self._branch(
            lambda: self._limbs(x, weight, rowscale)))

    def _branch(self, build: Callable[[], str]) -> onnx.GraphProto:
        """A subgraph of the nodes `build` adds (reading the outer graph's values and initializers)."""
        g = self.g
        outer, g.nodes = g.nodes, []
        out = build()
        nodes, g.nodes = g.nodes, outer
        return helper.make_graph(nodes, g.name("branch"), [], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                                             None)])

    def _uint8_weight(self, qweight: QuantizedWeight, name: str) -> tuple[str, str]:
        """(the weight transposed to [in, out] as uint8 with zero point 128, one float scale per output)."""
        rows = qweight.qweight.shape[0]
        weight = (qweight.qweight.t().to(torch.int16) + UINT8_SHIFT).to(torch.uint8)
        rowscale = qweight.scale.reshape(-1).float().expand(rows)  # per tensor: the one scale for every row
        return (self.g.tensor(f"{name}.weight_uint8_t", _array(weight, np.uint8)),
                self.g.tensor(f"{name}.weight_scale", _array(rowscale)))

    def _limbs(self, x: str, weight: str, rowscale: str) -> str:
        g = self.g
        absmax = g.op("ReduceMax", [g.op("Abs", [x]), g.const([-1], np.int64)], keepdims=1)
        scale = g.op("Div", [g.op("Max", [absmax, g.const(MIN_SCALE)]), g.const(127.0)])
        residual, limbs, scales = x, [], []
        for index in range(LIMBS):
            q = g.op("Clip", [g.op("Round", [g.op("Div", [residual, scale])]), g.const(-127.0), g.const(127.0)])
            limbs.append(q)
            scales.append(scale)
            if index < LIMBS - 1:
                residual = g.op("Sub", [residual, g.op("Mul", [q, scale])])
                scale = g.op("Div", [scale, g.const(254.0)])
        stacked = g.op("Add", [g.op("Concat", limbs, axis=0), g.const(float(UINT8_SHIFT))])
        zero = g.const(UINT8_SHIFT, np.uint8)
        acc = g.op("MatMulInteger", [g.op("Cast", [stacked], to=TensorProto.UINT8), weight, zero, zero])
        parts = g.op("Split", [g.op("Cast", [acc], to=TensorProto.FLOAT)], outputs=LIMBS, axis=0, num_outputs=LIMBS)
        out = g.op("Mul", [parts[0], scales[0]])
        for part, limb_scale in zip(parts[1:], scales[1:], strict=True):
            out = g.op("Add", [out, g.op("Mul", [part, limb_scale])])
        return g.op("Mul", [out, rowscale])

    def _native(self, x: str, module: NativeLinear, name: str) -> str:
        g = self.g
        if module.bits != 8 or module.granularity == "group" or not module.symmetric:
            raise SinkquantError(f"{name}: {module.extra_repr()} cannot be exported to ONNX (valid: symmetric int8 "
                                 "weights per channel or per tensor)")
        if module.act_mode is None:
            self.weight_only_layers.append(name)
            return self._weight_only(x, module.quantized_weight(), name)
        weight = self._weight(module.quantized_weight(), name)
        if module.act_mode != "static" or module.act_bits != 8:
            raise SinkquantError(f"{name}: activations int{module.act_bits} {module.act_mode} cannot be exported to "
                                 "ONNX (valid: int8 static)")
        scale = float(module.act_scale.reshape(-1)[0])
        scale_name = g.tensor(f"{name}.input_scale", np.asarray(scale, np.float32))
        if module.act_symmetric:
            # sinkquant's symmetric grid is [-127, 127]; QuantizeLinear saturates at -128: clip first. The same
            # integers go in as uint8 with zero point 128 (q + 128): MLAS's x86 integer GEMMs take u8 x s8.
            x = g.op("Clip", [x, g.const(-127 * scale), g.const(127 * scale)])
            zero = g.tensor(f"{name}.input_zero_point", np.asarray(128, np.uint8))
        else:
            zero = g.tensor(f"{name}.input_zero_point",
                            np.asarray(round(float(module.act_zero_point.reshape(-1)[0])), np.uint8))
        q = g.op("QuantizeLinear", [x, scale_name, zero])
        dq = g.op("DequantizeLinear", [q, scale_name, zero])
        self.quantized_layers.append(name)
        return g.op("MatMul", [dq, weight])

    def norm(self, x: str, module: nn.Module, name: str, offset: float) -> str:
        """RMSNorm as transformers computes it (float32, x * rsqrt(mean(x^2) + eps) * (offset + weight))."""
        g = self.g
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
        if eps is None or getattr(module, "bias", None) is not None:
            raise SinkquantError(f"{name} is {type(module).__name__}; the ONNX export writes RMS norms")
        square = g.op("Pow", [x, g.const(2.0)])
        mean = g.op("ReduceMean", [square, g.const([-1], np.int64)], keepdims=1)
        root = g.op("Sqrt", [g.op("Add", [mean, g.const(eps)])])
        normed = g.op("Div", [x, root])
        weight = module.weight.detach().float() + offset
        y = g.op("Mul", [normed, g.tensor(f"{name}.weight", _array(weight))])
        rotation = getattr(module, OUTPUT_ATTRIBUTE, None)
        if rotation is not None:
            y = g.op("MatMul", [y, g.tensor(f"{name}.output_rotation", _array(rotation.matrix))])
        return y

    # --- the decoder ----------------------------------------------------------------------------------------
    def rope_cache(self, layer_type: str | None) -> tuple[str, str]:
        """cos and sin [max positions, head_dim / 2] for GroupQueryAttention's own rotary, computed as transformers'
        rotary embedding computes them (float32 positions times inv_freq, times the attention scaling); written
        once per RoPE base (layer types without their own inv_freq share the model's)."""
        rotary = self.model.get_submodule(self.adapter.layers.rsplit(".", 1)[0]).rotary_emb
        prefix = f"{layer_type}_" if layer_type and hasattr(rotary, f"{layer_type}_inv_freq") else ""
        if prefix not in self.rope_tables:
            inv_freq = getattr(rotary, f"{prefix}inv_freq").float()
            scaling = float(getattr(rotary, f"{prefix}attention_scaling"))
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]
            self.rope_tables[prefix] = (self.g.tensor(f"rope.{prefix}cos_cache", _array(freqs.cos() * scaling)),
                                        self.g.tensor(f"rope.{prefix}sin_cache", _array(freqs.sin() * scaling)))
        return self.rope_tables[prefix]

    def attention(self, x: str, layer: nn.Module, index: int, rope: tuple[str, str], window: int | None,
                  lengths: tuple[str, str]) -> str:
        g, attn_name = self.g, f"{self.adapter.layers}.{index}.{self.adapter.attention}"
        attn = layer.get_submodule(self.adapter.attention)
        offset = self.adapter.norm_weight_offset
        parts = []
        for part, heads in (("q", self.heads), ("k", self.kv_heads), ("v", self.kv_heads)):
            y = self.linear(x, attn.get_submodule(f"{part}_proj"), f"{attn_name}.{part}_proj")
            norm = getattr(attn, f"{part}_norm", None)
            if norm is not None:
                y = g.op("Reshape", [y, g.const([0, 0, heads, self.head_dim], np.int64)])
                y = self.norm(y, norm, f"{attn_name}.{part}_norm", offset)
                y = g.op("Reshape", [y, g.const([0, 0, heads * self.head_dim], np.int64)])
            parts.append(y)
        # ONNX Runtime's fused GroupQueryAttention (com.microsoft): RoPE from the cos/sin caches at positions
        # past + 0..seq-1, causal and sliding-window masking, GQA heads and the past KV in one kernel. Unfused
        # (MatMul / Softmax, RoPE as Slice / Mul / Add around transposes) it took ~60% of a SmolLM2 prefill.
        context = g.op("GroupQueryAttention", [*parts, *past_names(index), *lengths, *rope], [
            f"{attn_name}.context", *present_names(index)], domain="com.microsoft", num_heads=self.heads,
            kv_num_heads=self.kv_heads, scale=float(attn.scaling), local_window_size=window or -1, do_rotary=1,
            rotary_interleaved=0)[0]
        # a contrib operator's output type is unknown to onnx.shape_inference (ONNX Runtime's quantizer needs it)
        g.value_info.append(helper.make_tensor_value_info(context, TensorProto.FLOAT,
                                                          ["batch", "seq", self.heads * self.head_dim]))
        return self.linear(context, attn.o_proj, f"{attn_name}.o_proj")

    def mlp(self, x: str, layer: nn.Module, index: int) -> str:
        g, name = self.g, f"{self.adapter.layers}.{index}.mlp"
        mlp = layer.mlp
        gate = self.linear(x, mlp.gate_proj, f"{name}.gate_proj")
        up = self.linear(x, mlp.up_proj, f"{name}.up_proj")
        if self.activation == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        else:
            act = g.op("Gelu", [gate], approximate="tanh")
        return self.linear(g.op("Mul", [act, up]), mlp.down_proj, f"{name}.down_proj")

    def _layer_types(self) -> list[str]:
        return list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.config.num_hidden_layers)

    def embed(self, ids: str) -> str:
        g = self.g
        embedding = self.model.get_input_embeddings()
        if self.int8_embeddings:
            rows = int8_rows(embedding.weight.detach().float())
            values = g.op("Gather", [g.tensor("embed_tokens.weight_int8", _array(rows.qweight, np.int8)), ids])
            scales = g.op("Gather", [g.tensor("embed_tokens.weight_scale", _array(rows.scale)), ids])
            hidden = g.op("Mul", [g.op("Cast", [values], to=TensorProto.FLOAT), scales])
        else:
            hidden = g.op("Gather", [g.tensor("embed_tokens.weight", _array(embedding.weight)), ids])
        scale = getattr(embedding, "embed_scale", None)
        if scale is not None:
            hidden = g.op("Mul", [hidden, g.const(float(scale.to(embedding.weight.dtype)))])
        return hidden

    def build(self) -> onnx.ModelProto:
        config, g, adapter = self.config, self.g, self.adapter
        if config.model_type not in SUPPORTED_TYPES:
            raise SinkquantError(f"model_type={config.model_type!r} cannot be exported to ONNX yet; valid: "
                                 f"{', '.join(SUPPORTED_TYPES)}")
        if self.activation not in ACTIVATIONS:
            raise SinkquantError(f"hidden activation {self.activation!r} cannot be exported to ONNX; valid: "
                                 f"{', '.join(ACTIVATIONS)}")
        # GroupQueryAttention's lengths from the attention mask [batch, past + seq] (all ones: rows are unpadded):
        # each row's total - 1, and the total. With a KV buffer shared between past and present (I/O binding) the
        # past inputs are longer than the past, so the mask, not their shape, says where the past ends.
        mask_sum = g.op("ReduceSum", [ATTENTION_MASK, g.const([1], np.int64)], keepdims=0)
        total = g.op("Shape", [ATTENTION_MASK], start=1, end=2)
        lengths = (g.op("Cast", [g.op("Sub", [mask_sum, g.const(1, np.int64)])], to=TensorProto.INT32),
                   g.op("Cast", [g.op("Reshape", [total, g.const([], np.int64)])], to=TensorProto.INT32))
        ropes = {t: self.rope_cache(t) for t in set(self._layer_types())}
        hidden = self.embed("input_ids")
        offset = adapter.norm_weight_offset
        for index, (layer, layer_type) in enumerate(zip(adapter.decoder_layers(self.model), self._layer_types(),
                                                        strict=True)):
            prefix = f"{adapter.layers}.{index}"
            window = config.sliding_window if layer_type == "sliding_attention" else None
            readers = [norm for norm, _ in adapter.norm_readers]
            normed = self.norm(hidden, layer.get_submodule(readers[0]), f"{prefix}.{readers[0]}", offset)
            out = self.attention(normed, layer, index, ropes[layer_type], window, lengths)
            posts = list(adapter.post_norms)
            if posts:
                out = self.norm(out, layer.get_submodule(posts[0]), f"{prefix}.{posts[0]}", offset)
            hidden = g.op("Add", [hidden, out])
            normed = self.norm(hidden, layer.get_submodule(readers[1]), f"{prefix}.{readers[1]}", offset)
            out = self.mlp(normed, layer, index)
            if posts:
                out = self.norm(out, layer.get_submodule(posts[1]), f"{prefix}.{posts[1]}", offset)
            hidden = g.op("Add", [hidden, out])
        # logits_to_keep (0: every position): the last k positions only, e.g. 1 in a prefill for generation
        keep = g.op("Neg", [g.op("Reshape", [LOGITS_TO_KEEP, g.const([1], np.int64)])])
        hidden = g.op("Slice", [hidden, keep, g.const([np.iinfo(np.int64).max], np.int64), g.const([1], np.int64)])
        hidden = self.norm(hidden, adapter.final_norm_module(self.model), adapter.final_norm, offset)
        head = self.model.get_output_embeddings()
        cap = getattr(config, "final_logit_softcapping", None)
        logits = self.linear(hidden, head, adapter.lm_head)
        if cap:
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, g.const(float(cap))])]), g.const(float(cap))])
        g.op("Identity", [logits], ["logits"])
        return self._model()

    def _model(self) -> onnx.ModelProto:
        kv_shape = ["batch", self.kv_heads, "past", self.head_dim]
        present_shape = ["batch", self.kv_heads, "total", self.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total"]),
                  helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", self.config.vocab_size])]
        for index in range(self.config.num_hidden_layers):
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in past_names(index)]
            outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, present_shape)
                        for n in present_names(index)]
        graph = helper.make_graph(self.g.nodes, "sinkquant_decoder", inputs, outputs, self.g.initializers,
                                  value_info=self.g.value_info)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                              helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="sinkquant")
        model.ir_version = 10
        return model


def build_graph(model: nn.Module, int8_embeddings: bool = False) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """The decoder graph of `model` (float Linear, NativeLinear and Int8Head layers) and which layers went where."""
    builder = _Builder(model, int8_embeddings)
    with torch.no_grad():
        graph = builder.build()
    return graph, {"quantized": builder.quantized_layers, "weight_only": builder.weight_only_layers,
                   "float": builder.float_layers}


def save_graph(graph: onnx.ModelProto, folder: Path) -> None:
    """model.onnx with its tensors in model.onnx.data (protobuf's 2 GB limit)."""
    onnx.save_model(graph, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def _kept_outside_prefix(model: nn.Module, prefix_length: int) -> list[int]:
    keep = keep_state(model)
    if keep is None:
        return []
    outside = [p for p in keep.policy.positions if p >= prefix_length]
    return outside + [-1] * bool(keep.policy.token_ids)


def export_onnx(quantized: QuantizedModel, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an engine-made model (native or simulated layers) as an ONNX folder: model.onnx (+ .data), the fp
    prefix KV as prefix_kv.npz, tokenizer and config, and a manifest with every file's sha256; all or nothing."""
    refusals = onnx_refusals(quantized.recipe)
    model = quantized.model
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in SUPPORTED_TYPES:
        refusals.append(f"model_type={config.model_type!r}: no ONNX decoder graph for it yet (valid: "
                        f"{', '.join(SUPPORTED_TYPES)})")
    prefix = quantized.prefix
    prefix_length = len(prefix.ids) if prefix is not None and prefix.cache is not None else 0
    outside = _kept_outside_prefix(model, prefix_length)
    if outside:
        refusals.append(f"kept positions/tokens {outside} outside the fp prefix ({prefix_length} tokens): the QDQ "
                        "graph quantizes every row it runs")
    if refusals:
        raise SinkquantError(f"cannot export to ONNX: {refusals[0]}" + (
            f" (and {len(refusals) - 1} more: {'; '.join(refusals[1:])})" if len(refusals) > 1 else ""))
    model = native_copy(model)
    embeddings = quantized.recipe.scheme.embeddings
    int8 = embeddings is not None and embeddings.dtype == "int8"
    graph, layers = build_graph(model, int8_embeddings=int8)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_graph(graph, tmp)
        if prefix_length:
            arrays = {}
            for index, layer in enumerate(prefix.cache.layers):
                key, value = past_names(index)
                arrays[key], arrays[value] = _array(layer.keys), _array(layer.values)
            np.savez(tmp / PREFIX_FILE, **arrays)
        quantized.base.tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        atomic_write_json(tmp / ONNX_MANIFEST, {
            "format": "onnx", "opset": OPSET, "model": quantized.base.spec,
            "prefix_ids": list(prefix.ids) if prefix_length else [], "layers": layers,
            "recipe": quantized.recipe.resolved(), "files": file_digests(tmp, folder_files(tmp, ONNX_MANIFEST)),
            "versions": library_versions(),
        })
    return Path(out)
