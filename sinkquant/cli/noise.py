"""Upstream warnings and log lines a CLI user cannot act on, filtered for the CLI only (never in the library),
and the environment set before any heavy import."""

from __future__ import annotations

import os
import sys
from typing import Any

# Upstream noise a CLI user cannot act on; filtered here only, never in the library.
KNOWN_NOISE = {
    "torchao": ("Failed to load",),  # optional CUDA/mxfp8 .so files absent from CPU wheels
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "root": ("Please consider to run pre-processing", "Please consider pre-processing"),  # ONNX Runtime's quantizer
}


# Upstream deprecation warnings (warnings module) with the same policy. transformers 5.23 renames the forward's
# `past_key_values` to `cache`; the range sinkquant supports (>=5.0) starts before the new name exists.
KNOWN_WARNINGS = (r"`past_key_values` is deprecated",)


class _DropKnown:
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes

    def filter(self, record: Any) -> bool:
        message = str(record.msg)
        return not any(p in message for p in self.prefixes)


_FILTERS = {name: _DropKnown(prefixes) for name, prefixes in KNOWN_NOISE.items()}


def drop_known_noise() -> None:
    """Filter KNOWN_NOISE from the loggers that emit it, and KNOWN_WARNINGS (the test suite's workers use it too)."""
    import logging
    import warnings

    for name, drop in _FILTERS.items():
        logging.getLogger(name).addFilter(drop)  # the same object each call: added once
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def quiet_libraries(quiet: bool) -> None:
    """Before any heavy import: silence known upstream warnings and transformers' info logging; `quiet`: every
    progress bar, upstream ones included (tqdm reads TQDM_DISABLE as the default of `disable`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the hub's and transformers' own bars
        os.environ.setdefault("TQDM_DISABLE", "1")  # every other tqdm bar (compressed-tensors' decompression)
    drop_known_noise()
    if "transformers" in sys.modules:  # main() called in a process that imported it already: env comes too late
        hf_logging = sys.modules["transformers"].utils.logging
        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
