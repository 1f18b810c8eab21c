"""Text loading through `datasets`, one tokenization, and disjoint calibration / evaluation windows."""

from __future__ import annotations

import codecs
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinkquant.errors import SinkquantError
from sinkquant.hub import declared_offline, unreachable
from sinkquant.io import sha256_bytes
from sinkquant.memory import release_freed_memory

if TYPE_CHECKING:  # this module is torch-free until token ids are cut into windows: the CLI checks files first
    import torch

DEFAULT_DATA = "wikitext2"
WIKITEXT2_ENV = "SINKQUANT_WIKITEXT2"
WIKITEXT2_HUB = ("wikitext", "wikitext-2-raw-v1", "test")
_BUILDERS = {".txt": "text", ".raw": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Text:
    """A text with the facts a report must record about it."""

    text: str
    source: dict[str, Any]

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.text.encode("utf-8"))


def _check_utf8(path: Path) -> None:
    """Name the first undecodable byte and its offset; `datasets` only says that generation failed."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before the current block
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])  # an unfinished character carried over from the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise SinkquantError(f"data file {path} is not valid UTF-8: byte 0x{exc.object[exc.start]:02x} at "
                                     f"byte offset {offset - pending + exc.start}") from None
            offset += len(block)
    pending = len(decoder.getstate()[0])
    if pending:
        raise SinkquantError(f"data file {path} is not valid UTF-8: it ends inside a character that starts at "
                             f"byte offset {offset - pending}")


def _innermost(exc: BaseException) -> BaseException:
    """`datasets` wraps the real cause ("An error occurred while generating the dataset"); report that."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def check_data_file(path: Path, text_field: str, ctx: int = 0, windows: int = 1) -> str:
    """What can be refused about a local data file without a tokenizer or `datasets` (both slow to import): a
    folder, a missing file, an unknown suffix, not UTF-8, empty, not parquet inside, a JSON-lines row without
    `text_field`, or (a plain text, given `ctx`) fewer bytes than `windows` windows of ctx tokens need (a token
    covers at least one byte, but for a tokenizer's leading word marker). Returns the `datasets` builder."""
    if path.is_dir():
        raise SinkquantError(f"data path {path} is a folder; pass a file ({', '.join(_BUILDERS)})")
    if not path.is_file():
        raise SinkquantError(f"data file {path} does not exist or is not a file")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise SinkquantError(f"data file {path}: unsupported suffix {path.suffix!r}; valid: {', '.join(_BUILDERS)}")
    size = path.stat().st_size
    if size == 0:
        raise SinkquantError(f"data file {path} is empty; pass a file with text in it")
    if builder == "parquet":
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            tail = handle.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise SinkquantError(f"data file {path} is not a parquet file (no PAR1 magic bytes at its start and end)")
        return builder
    _check_utf8(path)
    if path.suffix.lower() == ".jsonl":
        _check_jsonl_row(path, text_field)
    if builder != "text":  # a JSON file's bytes are mostly structure: `datasets` reads it, the tokens tell
        return builder
    if size + 1 < ctx:
        raise SinkquantError(f"data file {path} has {size} bytes (at most {size + 1} tokens): its text is shorter "
                             f"than one window of ctx={ctx}; use a longer text or a smaller --ctx")
    if size + 1 < ctx * windows:
        raise SinkquantError(f"data file {path} has {size} bytes (at most {size + 1} tokens): too few for {windows} "
                             f"windows of ctx={ctx} (calibration plus one evaluation window); use a longer text, a "
                             "smaller --ctx or fewer --calib-windows")
    return builder


def _check_jsonl_row(path: Path, text_field: str) -> None:
    """The first row of a JSON-lines file is an object with `text_field` (a typo there otherwise costs a model
    load before `datasets` reports it)."""
    import json

    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError as exc:
        raise SinkquantError(f"data file {path}: line 1 is not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise SinkquantError(f"data file {path}: line 1 is a JSON {type(row).__name__}; each line must be an object "
                             f"with a {text_field!r} field")
    if text_field not in row:
        raise SinkquantError(f"data file {path} has no field {text_field!r}; fields: {', '.join(row)} "
                             "(choose one with --text-field)")


def _load_local(path: Path, text_field: str) -> Text:
    builder = check_data_file(path, text_field)
    import datasets

    datasets.disable_progress_bars()
    # A failure is raised below as one line with its cause; the builder's own ERROR log would repeat it.
    builder_log = logging.getLogger(f"datasets.packaged_modules.{builder}")
    level = builder_log.level
    builder_log.setLevel(logging.CRITICAL)
    try:
        if builder == "text":
            # sample_by="document" keeps the file byte-exact (one row = the whole file).
            rows = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
            text = "".join(rows["text"])
        else:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
            if text_field not in rows.column_names:
                raise SinkquantError(
                    f"data file {path} has no field {text_field!r}; fields: {', '.join(rows.column_names)} "
                    "(choose one with --text-field)"
                )
            text = "\n\n".join(rows[text_field])
    except SinkquantError:
        raise
    except Exception as exc:
        cause = _innermost(exc)
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise SinkquantError(f"could not read data file {path}: {type(cause).__name__}: {detail}") from exc
    finally:
        builder_log.setLevel(level)
    return Text(text=text, source={"kind": "file", "path": str(path), "builder": builder, "join": "file as is"})


def _load_hub(name: str, config: str | None, split: str, text_field: str) -> Text:
    offline = "Offline, pass a local file (--data path/to/file.txt), or for WikiText-2 set " \
              f"{WIKITEXT2_ENV}=path/to/wiki.test.raw"
    reason = None if declared_offline() else unreachable()
    if reason is not None:
        # Declared offline, `datasets` reads its cache at once; merely unreachable, it would retry for ~40 s.
        raise SinkquantError(f"could not load data set {name!r}: {reason}. {offline}, or set HF_HUB_OFFLINE=1 "
                             "to use a copy in the local hub cache")
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise SinkquantError(
            f"could not load data set {name!r} (config {config!r}, split {split!r}) from the hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. {offline}"
        ) from exc
    if text_field not in rows.column_names:
        raise SinkquantError(f"data set {name!r} has no field {text_field!r}; fields: {', '.join(rows.column_names)}")
    # GPTQ / SmoothQuant convention: rows joined with a blank line.
    text = "\n\n".join(rows[text_field])
    return Text(text=text, source={"kind": "hub", "name": name, "config": config, "split": split, "join": "\\n\\n"})


def load_text(
    spec: str = DEFAULT_DATA,
    config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    local_copy: str | None = None,
) -> Text:
    """`spec`: a local .txt/.raw/.jsonl/.json/.parquet file, a hub data set name, or 'wikitext2' (default:
    the local copy named by `local_copy` or $SINKQUANT_WIKITEXT2 when given, else the hub)."""
    path = local_data_path(spec, local_copy)
    if path is not None:
        loaded = _load_local(path, text_field)
        if spec == DEFAULT_DATA:
            loaded.source["dataset"] = "wikitext-2-raw-v1 test (local copy)"
        return loaded
    if spec == DEFAULT_DATA:
        return _load_hub(*WIKITEXT2_HUB[:2], split=WIKITEXT2_HUB[2], text_field=text_field)
    return _load_hub(spec, config, split, text_field)


def local_data_path(spec: str, local_copy: str | None = None) -> Path | None:
    """The local file `load_text` reads for `spec`; None for a hub data set."""
    if spec == DEFAULT_DATA:
        copy = local_copy or os.environ.get(WIKITEXT2_ENV)
        return Path(copy).expanduser() if copy else None
    path = Path(spec).expanduser()
    if path.suffix.lower() in _BUILDERS or path.exists() or spec.startswith((".", "/", "~")):
        return path
    return None


@dataclass
class TokenStream:
    """The whole text tokenized once (no special tokens), cut later into non-overlapping windows."""

    ids: torch.Tensor
    text_sha256: str
    source: dict[str, Any]

    def n_windows(self, ctx: int) -> int:
        if ctx < 2:
            raise SinkquantError(f"ctx={ctx} is too small; it must be at least 2 tokens")
        return self.ids.numel() // ctx

    def windows(self, ctx: int, indices: list[int]) -> torch.Tensor:
        import torch

        return torch.stack([self.ids[i * ctx : (i + 1) * ctx] for i in indices])


def tokenize(text: Text, tokenizer) -> TokenStream:
    """The text's ids. A fast tokenizer's working set for the whole text (offsets, token strings: 0.15 GB for
    WikiText-2's test split) is freed afterwards but would stay resident for the whole run without the trim."""
    ids = tokenizer(text.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    release_freed_memory()
    return TokenStream(ids=ids, text_sha256=text.sha256, source=text.source)


@dataclass(frozen=True)
class WindowPlan:
    """Which windows evaluate and which calibrate: taken from opposite ends so they never overlap."""

    ctx: int
    eval_windows: tuple[int, ...]
    calib_windows: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        def span(ws: tuple[int, ...]) -> str:
            return f"{ws[0]}..{ws[-1]}" if ws else "none"

        return {
            "ctx": self.ctx,
            "eval_windows": len(self.eval_windows),
            "eval_range": span(self.eval_windows),
            "calib_windows": len(self.calib_windows),
            "calib_range": span(self.calib_windows),
            "disjoint": not set(self.eval_windows) & set(self.calib_windows),
        }


def plan_windows(stream: TokenStream, ctx: int, max_windows: int | None = None, calib_windows: int = 0) -> WindowPlan:
    """Evaluation windows from the start of the text, calibration windows from its end."""
    if max_windows is not None and max_windows < 1:
        raise SinkquantError(f"max_windows={max_windows} must be at least 1 (or None for every window)")
    if calib_windows < 0:
        raise SinkquantError(f"calib_windows={calib_windows} must be 0 or more")
    total = stream.n_windows(ctx)
    if total < 1:
        raise SinkquantError(
            f"text has {stream.ids.numel()} tokens, shorter than one window of ctx={ctx}; "
            "use a longer text or a smaller --ctx"
        )
    if calib_windows >= total:
        raise SinkquantError(
            f"text has {total} windows of ctx={ctx}: too few for {calib_windows} calibration windows "
            "plus at least one evaluation window"
        )
    n_eval = total - calib_windows if max_windows is None else min(max_windows, total - calib_windows)
    eval_ids = tuple(range(n_eval))
    calib_ids = tuple(range(total - calib_windows, total))
    return WindowPlan(ctx=ctx, eval_windows=eval_ids, calib_windows=calib_ids)
