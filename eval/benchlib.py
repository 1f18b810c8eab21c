"""What every benchmark in eval/ shares: the common flags, loading the model and text once, a timed plain
forward loop, and a result file that records the command, the machine and the library versions."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sinkquant.cli.noise import quiet_libraries

quiet_libraries(quiet=False)  # the CLI's filter of upstream noise, before transformers imports torchao

from sinkquant.data import WIKITEXT2_ENV, TokenStream, load_text, tokenize  # noqa: E402
from sinkquant.io import atomic_write_json, atomic_write_text, library_versions  # noqa: E402
from sinkquant.models import LoadedModel, load_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Benchmarks run offline like the tests: WikiText-2 from ../shared unless the environment names a copy.
os.environ.setdefault(WIKITEXT2_ENV, str(REPO.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))


def parser(doc: str, windows: int, out: str) -> argparse.ArgumentParser:
    """Flags every benchmark takes; each script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=windows)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own); 1 gives steadier ratios on a shared machine")
    p.add_argument("--out", type=Path, default=REPO / out, help="result file stem (.md and .json are written)")
    return p


def configure(args: argparse.Namespace) -> None:
    """Threads and seed, before anything is built."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def setup(args: argparse.Namespace) -> tuple[LoadedModel, TokenStream]:
    configure(args)
    loaded = load_model(args.model)
    return loaded, tokenize(load_text(args.data), loaded.tokenizer)


def timed_forward(model: torch.nn.Module, windows: torch.Tensor, loss: bool = False) -> float:
    """What a user would write: one plain forward per window (with its own loss if asked), no hooks."""
    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            if loss:
                model(input_ids=window[None], labels=window[None]).loss.item()
            else:
                model(input_ids=window[None], use_cache=False)
    return time.perf_counter() - start


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_result(out: Path, title: str, body: str, payload: dict[str, Any]) -> None:
    """Markdown for people and JSON for machines, both atomically, each with the command and machine."""
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    # the payload's own machine and versions win: a re-render passes the measuring run's
    payload = {"command": command, "machine": machine(), "versions": library_versions(), **payload}
    text = (f"# {title}\n\n{body}\n\nCommand: `{command}`  \nMachine: {payload['machine']}  \n"
            f"Versions: {payload['versions']}\n")
    atomic_write_json(out.parent / f"{out.name}.json", payload)
    atomic_write_text(out.parent / f"{out.name}.md", text)
    print(text)
