"""Load a causal LM from a hub id, a local safetensors folder, a .gguf file or the embedded default."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sinkquant.adapters import Adapter, adapter_for, normalize
from sinkquant.artifacts import atomic_dir, sha256_file
from sinkquant.errors import SinkquantError
from sinkquant.zoo import ZOO, EmbeddedModel, embedded


@dataclass
class LoadedModel:
    """A model with what every later step needs to know about where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    spec: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def adds_bos(self) -> bool:
        """The model's own convention: does its tokenizer put BOS in front of a text?"""
        ids = self.tokenizer("a").input_ids
        return self.bos_id is not None and len(ids) > 0 and ids[0] == self.bos_id


def cache_root() -> Path:
    return Path(os.environ.get("SINKQUANT_CACHE_DIR", Path.home() / ".cache" / "sinkquant"))


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model holds fp32 weights but keeps a GgufHfQuantizer that blocks save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    quiet = logging.getLogger("transformers.modeling_gguf_pytorch_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise SinkquantError(f"could not read GGUF file {path}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def convert(spec: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write any loadable model (GGUF included) as a safetensors folder that from_pretrained reads."""
    loaded = load_model(spec)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return Path(out)


def _embedded_folder(entry: EmbeddedModel, dtype: torch.dtype) -> tuple[Path, str]:
    """Dequantizing a GGUF takes ~30 s; do it once and keep a safetensors copy in the cache."""
    gguf = entry.path()
    digest = sha256_file(gguf)
    folder = cache_root() / "models" / f"{entry.name}-{digest[:16]}"
    if not (folder / "model.safetensors").is_file():
        model, tokenizer = _load_gguf(gguf, dtype)
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return folder, digest


def empty_model(folder: str | os.PathLike) -> PreTrainedModel:
    """The architecture saved in `folder`'s config.json, fp32, randomly initialised: the skeleton that a
    quantized state dict is loaded into."""
    config = AutoConfig.from_pretrained(folder)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_model(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, spec: str) -> LoadedModel:
    """A randomly initialised fp32 model of `config`, normalized like a loaded one: for tests and memory
    benchmarks, which need an architecture's shapes, not trained weights."""
    model = normalize(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=spec,
                       source={"kind": "random", "model_type": config.model_type})


def _folder_digest(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return "+".join(sha256_file(f)[:16] for f in files)


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """`spec` is a zoo name ('smollm2-135m' by default), a .gguf file, a local folder, or a hub id (needs internet)."""
    path = Path(spec).expanduser()
    entry = embedded(spec)
    if entry is not None:
        folder, digest = _embedded_folder(entry, dtype)
        model, tokenizer = _from_pretrained(str(folder), dtype, trust_remote_code, local=True)
        source = {"kind": "embedded", "gguf": entry.filename, "sha256": digest}
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SinkquantError(f"model file {path} does not exist (expected a readable .gguf file)")
        model, tokenizer = _load_gguf(path, dtype)
        source = {"kind": "gguf", "path": str(path), "sha256": sha256_file(path)}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SinkquantError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
        model, tokenizer = _from_pretrained(str(path), dtype, trust_remote_code, local=True)
        source = {"kind": "folder", "path": str(path), "sha256": _folder_digest(path)}
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SinkquantError(
            f"model {spec!r} is neither a folder with config.json, a .gguf file, one of {', '.join(ZOO)}, "
            "nor a hub id like 'HuggingFaceTB/SmolLM2-135M'"
        )
    else:
        model, tokenizer = _from_pretrained(spec, dtype, trust_remote_code, local=False)
        source = {"kind": "hub", "id": spec, "sha256": getattr(model.config, "_commit_hash", None) or "unknown"}
    adapter = adapter_for(model)
    normalize(model)
    model.eval()
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, source=source)


def _from_pretrained(
    spec: str, dtype: torch.dtype, trust_remote_code: bool, local: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local
        )
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code, local_files_only=local)
    except OSError as exc:
        where = "local folder" if local else "hub id (needs internet; pass a local folder or .gguf when offline)"
        raise SinkquantError(f"could not load model {spec!r} as a {where}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise SinkquantError(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer
