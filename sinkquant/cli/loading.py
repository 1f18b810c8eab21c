"""Where the model runs and loading the model and text the common flags name (torch is imported inside the
functions, so importing this module stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinkquant.errors import SinkquantError

if TYPE_CHECKING:
    from sinkquant.data import TokenStream
    from sinkquant.models import LoadedModel
    from sinkquant.recipe import Recipe


def resolve_device(name: str) -> str:
    """'auto' picks cuda when torch sees a GPU; asking for cuda without one is a one-line error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SinkquantError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return name


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's keyword arguments from --dtype, --device and --trust-remote-code."""
    import torch

    return {"dtype": getattr(torch, args.dtype), "device": resolve_device(args.device),
            "trust_remote_code": args.trust_remote_code}


def stream_reason(args: argparse.Namespace, recipe: Recipe | None = None) -> str | None:
    """Why --model is read one decoder layer at a time (--stream: auto when it would not fit in memory, always,
    never), or None; `recipe`: what quantizing it would run (None: evaluation only). Streaming runs on the CPU."""
    import torch

    from sinkquant.engine.stream import streaming_decision

    if resolve_device(args.device) != "cpu":
        if args.stream == "always":
            raise SinkquantError("--stream always runs on the CPU; drop --device or use --stream never")
        return None
    return streaming_decision(args.model, recipe, getattr(torch, args.dtype), args.stream)


def streamed_embeddings(args: argparse.Namespace) -> Any:
    """The dtype a streamed checkpoint's embeddings and lm_head keep (in the artifact, and in memory for a recipe
    that stores them in another precision): the stored bf16/fp16 when the layers compute in fp32
    (engine.stream.open_checkpoint), else None."""
    import torch

    from sinkquant.models import folder_config

    stored = getattr(folder_config(Path(args.model).expanduser()), "dtype", None)
    return stored if stored in (torch.bfloat16, torch.float16) and args.dtype == "float32" else None


def load_inputs(args: argparse.Namespace, windows: int | None = None) -> tuple[LoadedModel, TokenStream]:
    """Model and token stream from the common flags. The text is tokenized first (the tokenizer alone is read),
    so a text too short for `windows` (as token_stream's) is refused before the model loads."""
    from sinkquant.models import load_model, load_tokenizer

    stream = token_stream(args, load_tokenizer(args.model, args.trust_remote_code), windows=windows)
    return load_model(args.model, **load_kwargs(args)), stream


def token_stream(args: argparse.Namespace, tokenizer: Any, spec: str | None = None, windows: int | None = None,
                 needs: str | None = None) -> TokenStream:
    """`spec` (default --data) tokenized, refused when it holds fewer than `windows` windows of --ctx tokens
    (default: the count check_data_args recorded for the command; `needs` says what they are for)."""
    from sinkquant.data import load_text, tokenize

    spec = spec or args.data
    stream = tokenize(load_text(spec, config=args.data_config, split=args.data_split, text_field=args.text_field,
                                local_copy=args.local_copy), tokenizer)
    windows = windows or getattr(args, "data_windows", 1)
    needs = needs or ("one evaluation window" if windows == 1 else "calibration windows plus one evaluation window")
    if stream.n_windows(args.ctx) < windows:
        raise SinkquantError(f"--data {spec}: {stream.ids.numel()} tokens make {stream.n_windows(args.ctx)} windows "
                             f"of --ctx {args.ctx}; this run needs {windows} ({needs}): use a longer text or a "
                             "smaller --ctx")
    return stream
