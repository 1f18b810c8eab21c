"""`sinkquant eval`: perplexity of a model on a text, as a table and an atomically written JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.cli.args import (
    add_data_args,
    add_model_args,
    add_output_args,
    add_stream_arg,
    max_windows,
    positive_int,
)
from sinkquant.cli.loading import load_inputs, load_kwargs, stream_reason, streamed_embeddings, token_stream


def check(args: argparse.Namespace) -> None:
    """Before torch: --out may be written, and a local --data file can hold one window."""
    from sinkquant.cli.args import check_data_args
    from sinkquant.io import check_output_file

    if args.out:
        check_output_file(args.out)
    check_data_args(args)


def run(args: argparse.Namespace) -> None:
    from sinkquant.backends.export.onnx_runtime import is_onnx_export
    from sinkquant.io import atomic_write_json, check_output_file
    from sinkquant.models import is_artifact
    from sinkquant.tables import print_table

    if args.out:
        check_output_file(args.out)  # an unwritable --out fails before the evaluation, not after
    artifact = is_artifact(args.model)
    if artifact or is_onnx_export(args.model):
        if args.batch_size > 1:  # dynamic-tensor activations and KV ranges would span the windows of a batch
            print(f"sinkquant eval: --batch-size {args.batch_size} not used: a quantized artifact or ONNX export is "
                  "evaluated one window per forward, as compare evaluates its rows")
        result, spec = _evaluate_artifact(args) if artifact else _evaluate_onnx(args)
    elif (manifest := _export_manifest(args.model)) is not None:
        result, spec = _evaluate_export(args, manifest)
    else:
        result, spec = _evaluate_model(args)
    print_table(
        f"{spec} on {result.data.get('path', result.data.get('name'))}",
        ["ctx", "windows", "BOS", "tokens", "perplexity", "word ppl", "bits/byte", "seconds"],
        [[result.ctx, result.windows, result.bos, result.tokens, f"{result.ppl:.4f}",
          f"{result.word_perplexity:.4f}", f"{result.bits_per_byte:.4f}", f"{result.seconds:.1f}"]],
    )
    if args.out:
        atomic_write_json(args.out, {**result.to_dict(), "device": args.device, "dtype": args.dtype})
        print(f"wrote {args.out}")


def _evaluate_artifact(args: argparse.Namespace):
    """A folder written by `sinkquant quantize` is evaluated as the artifact it is: its integer weights, static
    scales, prefix and kept positions; its calibration windows stay out of the evaluation windows."""
    from sinkquant.data import plan_windows
    from sinkquant.engine.artifact import load, open_manifest
    from sinkquant.models import folder_tokenizer

    _, recipe = open_manifest(Path(args.model), verify=not args.no_verify)  # before its tokenizer is read
    stream = token_stream(args, folder_tokenizer(Path(args.model)), windows=recipe.calibration.windows + 1)
    streamed = stream_reason(args, recipe) is not None
    quantized = load(args.model, verify=False, stream=streamed)  # verified above
    plan = plan_windows(stream, args.ctx, max_windows(args), calib_windows=quantized.recipe.calibration.windows)
    if streamed:
        print(f"sinkquant eval: streaming {args.model} one decoder layer at a time")
    return quantized.evaluate(stream, plan, bos=args.bos, progress=not args.quiet), quantized.base.spec


def _evaluate_model(args: argparse.Namespace):
    """A model (not a sinkquant folder): the text tokenized first, then the model in memory or, larger than memory
    (--stream), read one decoder layer at a time per window (engine.stream.evaluate_streaming, the same result)."""
    import torch

    from sinkquant.data import plan_windows
    from sinkquant.engine.stream import evaluate_streaming
    from sinkquant.models import load_model, load_tokenizer
    from sinkquant.perplexity import evaluate

    stream = token_stream(args, load_tokenizer(args.model, args.trust_remote_code))
    plan = plan_windows(stream, args.ctx, max_windows(args))
    reason = stream_reason(args)
    if reason is None:
        loaded = load_model(args.model, **load_kwargs(args))
        return evaluate(loaded, stream, plan, bos=args.bos, progress=not args.quiet,
                        batch_size=args.batch_size), loaded.spec
    print(f"sinkquant eval: streaming {args.model} one decoder layer at a time ({reason})")
    return evaluate_streaming(args.model, stream, plan, bos=args.bos, dtype=getattr(torch, args.dtype),
                              progress=not args.quiet, embeddings_dtype=streamed_embeddings(args),
                              batch_size=args.batch_size), args.model


def _refuse_streaming_an_export(args: argparse.Namespace) -> None:
    from sinkquant.errors import SinkquantError

    if args.stream == "always":
        raise SinkquantError(f"--stream always: {args.model} is an export folder, which its runtime reads whole; "
                             "stream the sinkquant artifact it came from, or drop --stream")


def _export_manifest(model: str) -> dict | None:
    from sinkquant.backends.export.compressed_tensors import export_manifest

    return export_manifest(model) if Path(model).is_dir() else None


def _evaluate_export(args: argparse.Namespace, manifest: dict):
    """A folder written by `sinkquant export` runs as its runtime runs it (transformers + compressed-tensors, its
    online transforms attached) behind its sidecar fp prefix KV, the tokens after the prefix only; its recipe's
    calibration windows stay out of the evaluation windows, as for the artifact it came from."""
    from sinkquant.backends.export.compressed_tensors import PREFIX_KV, load_prefix_cache, verify_export
    from sinkquant.data import plan_windows
    from sinkquant.perplexity import Prefix, evaluate

    _refuse_streaming_an_export(args)
    verify_export(args.model, manifest, verify=not args.no_verify)  # before any of its files is read
    calib = (manifest.get("recipe") or {}).get("calibration", {}).get("windows", 0)
    loaded, stream = load_inputs(args, windows=calib + 1)
    prefix = None
    if manifest.get("prefix_ids"):
        ids, cache = load_prefix_cache(args.model, loaded.model.config)
        prefix = Prefix(ids=ids, cache=cache)
    plan = plan_windows(stream, args.ctx, max_windows(args), calib_windows=calib)
    transforms = getattr(loaded.model, "transform_config", None)
    groups = transforms.config_groups if transforms is not None else {}
    online = [name for name, scheme in groups.items() if any(a.is_online() for a in scheme.apply)]
    said = [f"evaluated behind its fp prefix KV ({len(prefix.ids)} tokens {prefix.ids} from {PREFIX_KV})"
            if prefix is not None else "no prefix KV beside it"]
    if prefix is not None and args.bos != "never":
        said.append(f"--bos {args.bos} overridden (the prefix decides whether BOS is there)")
    if groups:
        said.append(f"transforms {', '.join(groups)} ({', '.join(online) or 'none'} online)")
    print(f"sinkquant eval: {args.model} is a {manifest.get('format')} export: {'; '.join(said)}")
    result = evaluate(loaded, stream, plan, bos=args.bos if prefix is None else "never", prefix=prefix,
                      progress=not args.quiet, batch_size=args.batch_size)
    return result, loaded.spec


def _evaluate_onnx(args: argparse.Namespace):
    """A folder written by `sinkquant export --format onnx`, run by ONNX Runtime: the same windows and evaluator,
    its fp prefix KV as the first past, its recipe's calibration windows kept out of the evaluation."""
    from sinkquant.backends.export.onnx_runtime import load_onnx, open_onnx_manifest
    from sinkquant.data import plan_windows
    from sinkquant.models import folder_tokenizer
    from sinkquant.perplexity import evaluate
    from sinkquant.recipe import parse_recipe

    _refuse_streaming_an_export(args)
    manifest, _ = open_onnx_manifest(Path(args.model), verify=not args.no_verify)  # before its tokenizer is read
    recipe = parse_recipe(manifest.get("recipe") or {}, str(args.model))
    stream = token_stream(args, folder_tokenizer(Path(args.model)), windows=recipe.calibration.windows + 1)
    loaded, prefix, manifest = load_onnx(args.model, verify=False)  # verified above
    plan = plan_windows(stream, args.ctx, max_windows(args), calib_windows=recipe.calibration.windows)
    said = f"behind its fp prefix KV ({len(prefix.ids)} tokens {prefix.ids})" if prefix is not None else "no prefix"
    print(f"sinkquant eval: {args.model} is an ONNX export, run by ONNX Runtime {said}")
    bos = args.bos if prefix is None else "never"
    return evaluate(loaded, stream, plan, bos=bos, prefix=prefix, progress=not args.quiet), loaded.spec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a model on a text")
    add_model_args(p)
    add_data_args(p)
    add_output_args(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (>= 1)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    add_stream_arg(p, " (a sinkquant artifact: its integers)")
    p.add_argument("--no-verify", action="store_true",
                   help="for an artifact or export folder: skip the sha256 check of its files (huge models)")
    p.set_defaults(func=run, check=check)
