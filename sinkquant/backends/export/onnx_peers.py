"""ONNX Runtime's own int8 quantization of sinkquant's fp32 ONNX graph: the peers an ONNX export is measured
against (`sinkquant compare --onnx-peers`, eval/bench_onnx.py), on the same graph and the same calibration windows.

Static (`quantize_static`): QDQ, per-channel int8 weights, per-tensor uint8 activations, ranges from MinMax,
Percentile or Entropy calibration over token windows with an empty past (ONNX Runtime has no prefix). Dynamic
(`quantize_dynamic`): per-channel int8 weights, activations quantized per tensor at run time. Calibration reads one
window at a time (ONNX Runtime's CalibStridedMinMax option, which merges each window's ranges or histograms into
the running ones): Percentile and Entropy otherwise hold every window's intermediate tensors at once, about 2 GB
per 512-token SmolLM2 window."""

from __future__ import annotations

import collections
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from torch import nn

from sinkquant.backends import ONNX_PEERS
from sinkquant.backends.export.onnx import ATTENTION_MASK, LOGITS_TO_KEEP, MODEL_FILE, build_graph, save_graph
from sinkquant.backends.export.onnx_runtime import OnnxCausalLM, cpu_session
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel

STATIC = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}
DYNAMIC = "dynamic"
assert (*STATIC, DYNAMIC) == ONNX_PEERS, "sinkquant.backends.ONNX_PEERS names the peers, torch-free"
# The matmul and attention kernels an optimized graph may hold: which of them ran says what was quantized.
KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits",
           "GroupQueryAttention", "MatMul", "FusedMatMul")
RUNTIME_VERSION = ort.__version__


def peer_label(method: str) -> str:
    """The row name of a peer, e.g. 'ONNX Runtime static MinMax'."""
    return "ONNX Runtime dynamic" if method == DYNAMIC else f"ONNX Runtime static {STATIC[method].name}"


def peer_description(method: str, calib_windows: int) -> str:
    if method == DYNAMIC:
        return ("ONNX Runtime's quantize_dynamic on the fp32 ONNX graph: per-channel int8 weights, uint8 activations "
                "quantized per tensor at run time")
    return (f"ONNX Runtime's quantize_static on the fp32 ONNX graph: QDQ, per-channel int8 weights, per-tensor uint8 "
            f"activations, {STATIC[method].name} calibration on {calib_windows} windows")


class CalibrationWindows:
    """onnxruntime.quantization's CalibrationDataReader over token windows, each with an empty past; `set_range`
    lets ONNX Runtime read a slice of them at a time."""

    def __init__(self, windows: list[torch.Tensor], model: OnnxCausalLM) -> None:
        self.feeds = [{"input_ids": w.numpy(), ATTENTION_MASK: np.ones(w.shape, np.int64),
                       LOGITS_TO_KEEP: np.asarray(0, np.int64), **model.empty_past(1)} for w in windows]
        self.set_range(0, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.pending, None)


def write_fp32_graph(model: nn.Module, folder: Path) -> Path:
    """The float decoder graph of `model`, the one every peer quantizes; its model.onnx path."""
    folder.mkdir(parents=True, exist_ok=True)
    save_graph(build_graph(model)[0], folder)
    return folder / MODEL_FILE


def onnx_model(base: LoadedModel, path: Path, threads: int | None = None) -> LoadedModel:
    """The graph at `path` run by ONNX Runtime behind `base`'s tokenizer and config, for the same evaluator."""
    return LoadedModel(model=OnnxCausalLM(cpu_session(path, threads), base.model.config), tokenizer=base.tokenizer,
                       adapter=base.adapter, spec=str(path), source={**base.source, "kind": "onnx"})


def quantize_peer(method: str, fp32: Path, out: Path, calibration: list[torch.Tensor], model: OnnxCausalLM) -> Path:
    """ONNX Runtime's `method` (one of ONNX_PEERS) applied to the fp32 graph `fp32`, written to `out`; static
    methods calibrate on `calibration` (token windows) run by `model` (the fp32 graph's OnnxCausalLM)."""
    if method not in ONNX_PEERS:
        raise SinkquantError(f"ONNX Runtime peer {method!r} is not valid; valid: {', '.join(ONNX_PEERS)}")
    out.mkdir(parents=True)
    target = out / MODEL_FILE
    if method == DYNAMIC:
        quantize_dynamic(fp32, target, weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=True)
        return target
    if not calibration:
        raise SinkquantError(f"ONNX Runtime static {method} needs calibration windows; none were given")
    with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print their progress
        quantize_static(fp32, target, CalibrationWindows(calibration, model), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=STATIC[method], use_external_data_format=True,
                        extra_options={"CalibStridedMinMax": 1})
    return target


def graph_bytes(path: Path) -> int:
    """Bytes of a graph file and its external data (the files beside it named after it)."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())


def kernel_counts(path: Path, threads: int | None = None) -> dict[str, int]:
    """Op counts of ONNX Runtime's optimized graph for `path` (which kernels run), subgraphs included."""
    with tempfile.TemporaryDirectory(prefix="sinkquant-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        cpu_session(path, threads, optimized)
        counts = _op_counts(onnx.load(str(optimized), load_external_data=False).graph)
    return {op: counts[op] for op in KERNELS if counts[op]}


def _op_counts(graph: onnx.GraphProto) -> collections.Counter:
    """Op types of `graph` and of its subgraphs (an If's branches: a weight-only layer is counted in each)."""
    counts = collections.Counter(n.op_type for n in graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                counts += _op_counts(attribute.g)
    return counts
