"""Atomic writes, hashes and provenance: an interrupted run never leaves a file or folder that looks complete."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from sinkquant.errors import SinkquantError

ARTIFACT_MANIFEST = "sinkquant.json"  # the file that marks a folder as a sinkquant artifact

TRACKED_PACKAGES = (
    "sinkquant", "torch", "transformers", "datasets", "bitsandbytes", "optimum-quanto", "torchao", "gguf",
    "compressed-tensors",
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


@functools.cache
def code_sha256() -> str:
    """sha256 of sinkquant's own .py sources (path and bytes): cached results of older code are never reused."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


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


def _umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the target. The file gets the mode
    a plain open() would give it (the target's own when it exists, else 0666 less the umask), not mkstemp's 0600,
    so teammates can read reports."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = target.stat().st_mode & 0o7777 if target.is_file() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # a parent that is a file, a read-only place: callers check first, this is the backstop
        raise SinkquantError(f"cannot write {target}: {exc.strerror} ({exc.filename})") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a folder in the target's place
            raise SinkquantError(f"cannot write {target}: {exc.strerror}") from exc
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_text(path, to_json(payload))


MAX_STRUCTURED_BYTES = 1 << 20  # recipes and baselines are a few hundred bytes; parsing 10 MB of YAML takes minutes
MAX_STRUCTURED_DEPTH = 64  # a recipe nests four levels; deeper is a mistake or an attack on the parser
MAX_STRUCTURED_NODES = 1_000_000  # after expanding YAML aliases (a "billion laughs" file is refused here)


def _shape_error(data: Any) -> str | None:
    """Why a parsed document nests too deeply, expands too far (YAML aliases share nodes) or refers to itself;
    None when it is fine. One iterative walk, each shared container counted once, so nothing is expanded."""
    counts: dict[int, int] = {}  # id of a finished container -> values under it once aliases are expanded
    path: set[int] = set()  # ids of the containers on the way down to the current one
    stack: list[tuple[Any, bool]] = [(data, False)] if isinstance(data, dict | list) else []
    while stack:
        node, finished = stack.pop()
        children = [c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, dict | list)]
        if finished:
            path.discard(id(node))
            counts[id(node)] = len(node) + sum(counts[id(c)] for c in children)
            if counts[id(node)] > MAX_STRUCTURED_NODES:
                return f"expands to more than {MAX_STRUCTURED_NODES:,} values (YAML aliases)"
        elif id(node) in path:
            return "refers to itself (a recursive YAML alias)"
        elif id(node) not in counts:
            path.add(id(node))
            if len(path) > MAX_STRUCTURED_DEPTH:
                return f"nests deeper than {MAX_STRUCTURED_DEPTH} levels"
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return None


def read_structured(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON or YAML file (by suffix). Whatever is wrong with it (missing, a folder, too big, not UTF-8,
    malformed, nested too deeply) is one error line naming the file, checked before the parser can hang or
    overflow the stack."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise SinkquantError(f"{what} path {path} is a folder; pass a .yaml or .json file")
    if path.exists() and not path.is_file():  # a fifo or a device: reading it could block or never end
        raise SinkquantError(f"{what} path {path} is not a regular file (a fifo, device or socket); pass a .yaml or "
                             ".json file")
    if not path.is_file():
        raise SinkquantError(f"{what} file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_STRUCTURED_BYTES:
        raise SinkquantError(f"{what} file {path} is {size:,} bytes; {what} files are limited to "
                             f"{MAX_STRUCTURED_BYTES:,} bytes")
    raw = path.read_bytes()[: MAX_STRUCTURED_BYTES + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SinkquantError(f"{what} file {path} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset "
                             f"{exc.start}") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SinkquantError(f"{what} file {path} is not valid {kind}: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise SinkquantError(f"{what} file {path} nests deeper than the {kind} parser can follow; "
                             f"{what} files nest at most {MAX_STRUCTURED_DEPTH} levels") from None
    problem = _shape_error(data)
    if problem:
        raise SinkquantError(f"{what} file {path} {problem}")
    return data


def read_manifest(folder: str | os.PathLike, name: str, missing_hint: str) -> dict[str, Any]:
    """The JSON object `name` that marks `folder` as written by sinkquant; its absence says what to do instead."""
    path = Path(folder) / name
    if not path.is_file():
        raise SinkquantError(f"{folder} has no {name}; {missing_hint}")
    manifest = read_structured(path, name)
    if not isinstance(manifest, dict):
        raise SinkquantError(f"{path} holds a JSON {type(manifest).__name__}; a sinkquant manifest is a JSON object "
                             "(the folder was edited or damaged; write it again)")
    return manifest


def _stale_siblings(target: Path) -> list[Path]:
    """Temp folders of `target` that a killed run left behind: `.<name>.old` and `.<name>.<pid>.*.partial` whose
    process is gone (older `.<name>.*.partial` without a pid count as stale too)."""
    if not target.parent.is_dir():
        return []
    stale = []
    partial = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)\.)?[^.]+\.partial$")
    for path in target.parent.iterdir():
        match = partial.match(path.name)
        if path.name == f".{target.name}.old" or (match and not _alive(match.group(1))):
            stale.append(path)
    return stale


def _alive(pid: str | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# Written by atomic_dir into every folder it creates: --overwrite replaces only a folder that holds it (or, for
# folders written before it existed, one of sinkquant's manifests), so it never deletes a user's own files.
OUTPUT_MARKER = ".sinkquant-output"
OUTPUT_MANIFESTS = (OUTPUT_MARKER, ARTIFACT_MANIFEST, "sinkquant_export.json", "sinkquant_backend.json")
# Folders --overwrite never replaces, whatever they hold (with the home folder and the current directory).
SYSTEM_FOLDERS = tuple(Path(p) for p in (
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt", "/proc",
    "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var"))


def _protected(resolved: Path) -> str | None:
    """Why --overwrite must never replace `resolved`; None when it may."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "is or contains the current directory"
    if resolved == home or resolved in home.parents:
        return "is or contains the home folder"
    if resolved in SYSTEM_FOLDERS:
        return "is a system folder"
    return None


def check_output_dir(path: str | os.PathLike, overwrite: bool, reads: tuple[str | os.PathLike, ...] = (),
                     owned: bool = False) -> Path:
    """Refuse, before any work is done, an output folder that exists (unless `overwrite`), that is a file, whose
    place cannot be written (read-only, under a file), or that --overwrite must not replace: the current
    directory, the home folder, a system folder or one of their parents, a folder holding (or inside) a path the
    command reads (`reads`), or a folder sinkquant did not write (no OUTPUT_MANIFESTS file). `owned`: the caller
    owns the place (sinkquant's own cache), so a damaged folder there may be replaced."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise SinkquantError(f"output path {target} exists and is a file; pass a folder path")
    if target.exists() and not overwrite:
        raise SinkquantError(f"output folder {target} already exists; pass --overwrite to replace it")
    resolved = target.resolve()
    for read in (r for r in reads if Path(r).exists()):  # a hub id or a model name is no folder here
        source = Path(read).resolve()
        if source == resolved or resolved in source.parents or source in resolved.parents:
            raise SinkquantError(f"output folder {target} is, holds or is inside {read}, which this command reads; "
                                 "pass a new folder, e.g. --out out/run1")
    if overwrite and target.exists():
        problem = _protected(resolved)
        if problem is not None:
            raise SinkquantError(f"output folder {target} {problem}; --overwrite would replace it: pass a new "
                                 "folder, e.g. --out out/run1")
        if not owned and any(target.iterdir()) and not any((target / n).is_file() for n in OUTPUT_MANIFESTS):
            raise SinkquantError(f"output folder {target} was not written by sinkquant (it has no "
                                 f"{OUTPUT_MARKER} or {ARTIFACT_MANIFEST}); --overwrite replaces only sinkquant's own "
                                 "output folders: pass a new folder or remove this one yourself")
    check_writable_place(target)
    return target


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work is done, an output file path that is a folder or whose place cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise SinkquantError(f"output path {target} is a folder; pass a file path, e.g. {target / 'result.json'}")
    check_writable_place(target)
    return target


def check_writable_place(path: str | os.PathLike, what: str = "output path", inside: bool = False) -> None:
    """Refuse, before any work, an output that could not be written: create and remove a probe folder where it
    will be written (beside `path`, or in it when `inside`), or in the nearest existing ancestor of that place.
    A probe is the only test that also holds for root, read-only mounts and ACLs."""
    place = Path(path).resolve() if inside else Path(path).resolve().parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise SinkquantError(f"{what} {path} is under {place}, which is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sinkquant.", suffix=".probe", dir=place))
    except OSError as exc:
        raise SinkquantError(f"{what} {path}: cannot write in {place} ({exc.strerror})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, owned: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`, marked with OUTPUT_MARKER; on success it replaces `path`, on failure it
    is removed. Temp folders that an earlier killed run left for the same target are removed first; the new folder
    and its files get the umask's mode. `owned`: see check_output_dir."""
    target = check_output_dir(path, overwrite, owned=owned)
    for stale in _stale_siblings(target):
        shutil.rmtree(stale, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        atomic_write_text(tmp / OUTPUT_MARKER, "written by sinkquant: `--overwrite` may replace this folder\n")
        yield tmp
        for written in tmp.rglob("*"):  # libraries that write 0600 (safetensors) get the mode of the rest
            if written.is_file():
                os.chmod(written, 0o666 & ~_umask())
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


def folder_files(folder: str | os.PathLike, manifest: str) -> list[str]:
    """Every file under `folder` (relative POSIX paths) but its `manifest`: what the manifest must list."""
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != manifest)


def check_listed(folder: str | os.PathLike, digests: Any, manifest: str) -> None:
    """Refuse, before anything is read, a file under `folder` that its manifest's digests do not list (added or
    left there after it was written: a loader would read it unverified)."""
    listed = set(digests) if isinstance(digests, dict) else set()
    unlisted = [name for name in folder_files(folder, manifest) if name not in listed]
    if unlisted:
        raise SinkquantError(f"{Path(folder) / unlisted[0]} is not listed in {Path(folder) / manifest}, so it cannot "
                             "be verified and is not read; remove it (or re-create the folder with sinkquant, if an "
                             "older version wrote it)")


def file_digests(folder: str | os.PathLike, names: list[str]) -> dict[str, str]:
    """sha256 of each named file of `folder`, for a manifest that proves later that the folder is whole."""
    return {name: sha256_file(Path(folder) / name) for name in names}


def recorded_digests(folder: str | os.PathLike, name: str, manifest: dict[str, Any], field: str, required: str,
                     consequence: str) -> dict[str, Any]:
    """The file digests manifest `name` records under `field`; one error line when they do not record `required`
    (`consequence` says what then cannot be trusted, and what to do)."""
    digests = manifest.get(field)
    if not isinstance(digests, dict) or required not in digests:
        raise SinkquantError(f"{Path(folder) / name}: field {field!r} does not record {required}, {consequence}")
    return digests


def verify_digests(folder: str | os.PathLike, digests: Any, what: str) -> None:
    """Check `folder`'s files against digests recorded by `file_digests`; the first missing or changed file is
    one error line naming it. `digests` comes from a file a user may have edited, so its shape is checked too."""
    folder = Path(folder)
    if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise SinkquantError(f"{what}: the recorded file digests must map file names to sha256 strings")
    for name, want in sorted(digests.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise SinkquantError(f"{what}: recorded file {name!r} is outside {folder}")
        if not path.is_file():
            raise SinkquantError(f"{what}: {path} is missing")
        got = sha256_file(path)
        if got != want:
            raise SinkquantError(f"{what}: {path} has changed since it was written (sha256 {got[:16]}..., "
                                 f"recorded {want[:16]}...)")
