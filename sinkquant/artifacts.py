"""Atomic writes, hashes and provenance: an interrupted run never leaves a file or folder that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from sinkquant.errors import SinkquantError

TRACKED_PACKAGES = (
    "sinkquant", "torch", "transformers", "datasets", "bitsandbytes", "optimum-quanto", "torchao", "gguf",
)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that change numbers, recorded in every result."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def to_json(payload: Any) -> str:
    """Deterministic JSON (sorted keys) so the same input gives byte-identical reports."""
    return json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_text(path, to_json(payload))


def read_structured(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON or YAML file (by suffix); a missing or malformed file is one clear error naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SinkquantError(f"{what} file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SinkquantError(f"{what} file {path} is not valid {kind}: {str(exc).splitlines()[0]}") from None


def read_manifest(folder: str | os.PathLike, name: str, missing_hint: str) -> Any:
    """The JSON file `name` that marks `folder` as written by sinkquant; its absence says what to do instead."""
    path = Path(folder) / name
    if not path.is_file():
        raise SinkquantError(f"{folder} has no {name}; {missing_hint}")
    return read_structured(path, name)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to clobber an existing output folder unless asked, before any work is done."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise SinkquantError(f"output folder {target} already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise SinkquantError(f"output path {target} exists and is not a folder")
    return target


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path`, on failure it is removed."""
    target = check_output_dir(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
