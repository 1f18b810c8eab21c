"""Cost of streaming quantization against model size: seeded random-weight models with the real configs of
Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B, written once as sharded bf16 safetensors (one shard per decoder layer
plus one for embeddings and lm_head, with the hub's index), quantized layer by layer from disk
(sinkquant.engine.stream; decoder layers computed in fp32, one at a time: bf16 matmuls are 4x slower than fp32
on a CPU without bf16 units; embeddings and lm_head left on disk, read per lookup and per vocabulary slice, and
stored bf16 in the artifact) by the static W8A8 recipe
(recipes/w8a8-prefix-smooth-except.yaml: prefix, smoothing, 8 exceptions) and by GPTQ W4A16 (int4 group-64, no
rotation: rotation is not streamed). Each run is its own process,
so its peak RSS (ru_maxrss) is its own; per-layer seconds are each decoder layer's turn in the pipeline (read,
smooth, quantize, calibrate, write), total seconds the whole quantization (prefix selection and smoothing
statistics included). Perplexity on a few windows, both streamed one layer at a time: the bf16 reference
(`evaluate_streaming`) and the quantized artifact (`load(..., stream=True)`). Random weights have no sinks: this
measures cost, not quality. The tokenizer is SmolLM2's (its ids lie inside Llama 3's vocabulary).

    python eval/bench_scale.py --shapes 1b                  # the 1B shape, cached under ~/.cache/sinkquant/scale
    python eval/bench_scale.py --shapes 8b --threads 2      # the 8B shape (16 GB of bf16 weights)"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import REPO, parser, write_result

SHAPES: dict[str, dict[str, Any]] = {  # the public config.json values of each model
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True, "rope_factor": 32.0},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True, "rope_factor": 32.0},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False, "rope_factor": 8.0},
}
NAMES = {"1b": "Llama-3.2-1B", "3b": "Llama-3.2-3B", "8b": "Llama-3.1-8B"}
# Llama-3.1-70B's decoder layer, for the projection only (never measured here): hidden, intermediate, heads, kv heads
LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "head_dim": 128}


def layer_params(shape: dict[str, Any]) -> int:
    """Weights of one decoder layer's Linears: what its calibration and quantization cost scales with."""
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    return 2 * h * shape["num_attention_heads"] * d + 2 * h * shape["num_key_value_heads"] * d + 3 * h * i
GPTQ = {"name": "w4a16-gptq-norotate", "description": "int4 group-64 GPTQ, no rotation",
        "scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 64, "gptq": {}}}}
STATIC = REPO / "recipes/w8a8-prefix-smooth-except.yaml"


def llama_config(shape: str):
    from transformers import LlamaConfig

    s = dict(SHAPES[shape])
    factor = s.pop("rope_factor")
    return LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
                       bos_token_id=128000, eos_token_id=128001, attention_bias=False, mlp_bias=False,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192},
                       dtype="bfloat16", **s)


def write_checkpoint(shape: str, folder: Path, seed: int = 0) -> Path:
    """The random model as a hub checkpoint, one layer in memory at a time: N(0, 0.02) weights (seeded per
    tensor name), unit norms, bf16. Written once; a complete folder is reused."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sinkquant.io import atomic_dir, atomic_write_json

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    config = llama_config(shape)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {n: t.shape for n, t in skeleton.state_dict().items() if not (config.tie_word_embeddings
                                                                          and n == "lm_head.weight")}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    weight_map: dict[str, str] = {}
    with atomic_dir(folder, overwrite=False) as tmp:
        for number, (key, names) in enumerate(groups.items(), 1):
            tensors = {}
            for name in names:
                if name.endswith("norm.weight"):
                    tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
                    continue
                generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + number)
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            print(f"  wrote {key} ({file})", flush=True)
        config.save_pretrained(tmp)
        atomic_write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        AutoTokenizer.from_pretrained(_smollm2_folder()).save_pretrained(tmp)
    return folder


def _smollm2_folder() -> Path:
    """The embedded SmolLM2's cached folder (its tokenizer); made on first use by load_model."""
    from sinkquant.models import cache_root

    found = sorted((cache_root() / "models").glob("smollm2-135m-*"))
    if not found:
        from sinkquant.models import load_model

        load_model("smollm2-135m")
        found = sorted((cache_root() / "models").glob("smollm2-135m-*"))
    return found[0]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: quantize (static | gptq) or perplexity (fp | the artifact)."""
    from sinkquant.data import load_text, plan_windows, tokenize
    from sinkquant.engine.artifact import load
    from sinkquant.engine.stream import evaluate_streaming, quantize_streaming
    from sinkquant.recipe import Recipe, load_recipe, parse_recipe

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    folder = Path(args.checkpoint)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoTokenizer

    stream = tokenize(load_text(args.data), AutoTokenizer.from_pretrained(folder))
    start = time.perf_counter()
    result: dict[str, Any] = {}
    if args.task in ("static", "gptq"):
        recipe: Recipe = load_recipe(STATIC) if args.task == "static" else parse_recipe(GPTQ, "gptq")
        recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
            update={"windows": args.calib_windows})})
        quantized = quantize_streaming(folder, recipe, stream, ctx=args.ctx, out=args.artifact, overwrite=True,
                                       dtype=dtype, embeddings_dtype=torch.bfloat16, progress=False)
        result["layer_seconds"] = quantized.record["stream"]["layer_seconds"]
        result["layer_reads"] = quantized.record["stream"]["layer_reads"]
    else:
        plan = plan_windows(stream, args.ctx, max_windows=args.windows)
        if args.task == "ppl-fp":
            ppl = evaluate_streaming(folder, stream, plan, bos="never", dtype=dtype, embeddings_dtype=torch.bfloat16)
        else:
            quantized = load(args.artifact, stream=True)
            ppl = quantized.evaluate(stream, plan, bos="never", progress=False)
        result["ppl"] = ppl.ppl
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def run_worker(args: argparse.Namespace, task: str, checkpoint: Path, artifact: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", task, "--checkpoint", str(checkpoint), "--artifact",
               str(artifact), "--ctx", str(args.ctx), "--windows", str(args.windows), "--calib-windows",
               str(args.calib_windows), "--data", args.data, "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        raise SystemExit(f"{task} on {checkpoint} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__, windows=2, out="eval/results/scale")
    p.set_defaults(ctx=256)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["1b"])
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--recipes", nargs="+", choices=["static", "gptq"], default=["static", "gptq"],
                   help="which quantizations to run per shape (default both)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sinkquant" / "scale",
                   help="where the random checkpoints are written once and reused")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the dtype a decoder layer is read into and computed in (the checkpoint is bf16 either way; "
                        "bf16 halves the layer in memory, and runs slower on CPUs without bf16 instructions)")
    p.add_argument("--worker", choices=["static", "gptq", "ppl-fp", "ppl-quant"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    p.add_argument("--append", action="store_true",
                   help="keep the rows of --out measured earlier (each with its own command), replacing those of the "
                        "same shape and recipe: one table from several runs")
    p.add_argument("--render", action="store_true",
                   help="rewrite the .md and .png from the .json of an earlier run (its command is kept)")
    args = p.parse_args()
    if args.render:
        measured = json.loads(args.out.with_suffix(".json").read_text())
        command = measured.get("measured_by", measured["command"])
        settings = p.parse_args(shlex.split(command)[2:])  # the measuring run's ctx and windows
        body = table(measured["rows"], settings) + f"\n\nMeasured by: `{command}`"
        write_result(args.out, "Streaming quantization cost against model size", body,
                     {"rows": measured["rows"], "measured_by": command, "machine": measured["machine"],
                      "versions": measured["versions"]})
        plot(measured["rows"], args.out.with_suffix(".png"))
        return
    if args.worker:
        args.task = args.worker
        print(json.dumps(worker(args)))
        return
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    earlier = args.out.with_suffix(".json")
    rows = json.loads(earlier.read_text())["rows"] if args.append and earlier.is_file() else []
    for shape in args.shapes:
        checkpoint = write_checkpoint(shape, args.cache / f"{NAMES[shape]}-random-bf16")
        weight_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        fp = run_worker(args, "ppl-fp", checkpoint, Path("-"))
        for task in args.recipes:
            artifact = args.cache / f"{NAMES[shape]}-{task}"
            quant = run_worker(args, task, checkpoint, artifact)
            ppl = run_worker(args, "ppl-quant", checkpoint, artifact)
            layers = SHAPES[shape]["num_hidden_layers"]
            row = {"shape": NAMES[shape], "recipe": task, "dtype": args.dtype, "layers": layers,
                   "weight_bytes": weight_bytes,
                   "peak_rss_bytes": quant["peak_rss_bytes"], "rss_ratio": quant["peak_rss_bytes"] / weight_bytes,
                   "seconds": quant["seconds"], "layer_seconds_mean": sum(quant["layer_seconds"]) / layers,
                   "layer_seconds": quant["layer_seconds"], "layer_reads": quant["layer_reads"],
                   "fp_ppl": fp["ppl"], "quant_ppl": ppl["ppl"], "fp_peak_rss_bytes": fp["peak_rss_bytes"],
                   "command": command}
            rows = sorted([r for r in rows if _key(r) != _key(row)] + [row],
                          key=lambda r: (r["recipe"], _dtype(r), r["weight_bytes"]))
            print(json.dumps({k: v for k, v in row.items() if k != "layer_seconds"}), flush=True)
            # written after every row: a long run leaves what it measured so far
            write_result(args.out, "Streaming quantization cost against model size", table(rows, args),
                         {"rows": rows})
            plot(rows, args.out.with_suffix(".png"))


def _dtype(row: dict[str, Any]) -> str:
    return row.get("dtype", "float32")  # rows measured before --dtype existed computed in float32


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["shape"], row["recipe"], _dtype(row)


def _threads(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The thread counts of the rows' commands (rows from several runs may differ)."""
    counts = set()
    for row in rows:
        words = shlex.split(row.get("command", ""))
        given = words[words.index("--threads") + 1] if "--threads" in words[:-1] else None
        counts.add(given or str(args.threads or torch.get_num_threads()))
    if len(counts) == 1:
        return f"threads {counts.pop()}"
    return f"threads {' or '.join(sorted(counts))} (each row's command says which)"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| model shape | recipe | layers in | layers | weights GB | peak RSS GB | RSS / weights | s per layer | "
             "s per layer per 100M layer weights | total s | bf16 ppl | quantized ppl |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = {v: k for k, v in NAMES.items()}
    for r in rows:
        per_weight = r["layer_seconds_mean"] / (layer_params(SHAPES[key[r["shape"]]]) / 1e8)
        lines.append(f"| {r['shape']} (random) | {r['recipe']} | {_dtype(r)} | {r['layers']} | "
                     f"{r['weight_bytes'] / 1e9:.2f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['rss_ratio']:.2f}x | {r['layer_seconds_mean']:.1f} | "
                     f"{per_weight:.1f} | {r['seconds']:.0f} | {r['fp_ppl']:.1f} | {r['quant_ppl']:.1f} |")
    largest = max(rows, key=lambda r: r["weight_bytes"])["shape"]
    ratio = layer_params(LLAMA_70B) / layer_params(SHAPES[key[largest]])
    layers = LLAMA_70B["num_hidden_layers"]
    projection = "; ".join(
        f"{r['recipe']} ({_dtype(r)}): pipeline {layers * r['layer_seconds_mean'] * ratio / 3600:.1f} h, whole run "
        f"{r['seconds'] / r['layers'] * layers * ratio / 3600:.1f} h" for r in rows if r["shape"] == largest)
    commands = sorted({r.get("command", "") for r in rows} - {""})
    measured = "".join(f"\n- `{c}`" for c in commands)
    return ("\n".join(lines) + f"\n\nctx {args.ctx}, {args.calib_windows} calibration windows, {args.windows} "
            f"evaluation windows, {_threads(rows, args)}, machine shared with other jobs. "
            "'s per layer': each decoder layer's turn in the quantization pipeline; 'total s' adds the whole-model "
            "forwards before it (prefix selection with its profile and fp-loss checks, smoothing statistics), which "
            "read every layer once per calibration window."
            f"\n\nProjection to Llama-3.1-70B (not measured): {largest}'s seconds scaled by the ratio of decoder-layer "
            f"weights ({ratio:.1f}x per layer) and by layer count (80), same ctx and windows, "
            f"same machine: {projection}." + (f"\n\nRows measured by:{measured}" if measured else ""))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for recipe, dtype in sorted({(r["recipe"], _dtype(r)) for r in rows}):
        mine = [r for r in rows if (r["recipe"], _dtype(r)) == (recipe, dtype)]
        size = [r["weight_bytes"] / 1e9 for r in mine]
        left.plot(size, [r["peak_rss_bytes"] / 1e9 for r in mine], "o-", label=f"{recipe}, layers in {dtype}")
        right.plot(size, [r["layer_seconds_mean"] for r in mine], "o-", label=f"{recipe}, layers in {dtype}")
    left.set(xlabel="bf16 weights (GB)", ylabel="peak RSS (GB)", title="memory")
    right.set(xlabel="bf16 weights (GB)", ylabel="seconds per decoder layer", title="time")
    for axis in (left, right):
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "eval"))
    main()
