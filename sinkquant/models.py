"""Load a causal LM from a hub id, a local safetensors folder, a .gguf file or the embedded default."""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sinkquant.adapters import Adapter, adapter_for, normalize
from sinkquant.errors import SinkquantError
from sinkquant.hub import declared_offline, unreachable
from sinkquant.io import (
    ARTIFACT_MANIFEST,
    atomic_dir,
    atomic_write_json,
    check_output_dir,
    file_digests,
    library_versions,
    read_structured,
    sha256_file,
    verify_digests,
)
from sinkquant.online_transforms import attach_saved_transforms
from sinkquant.zoo import ZOO, EmbeddedModel, embedded

log = logging.getLogger(__name__)
CACHE_RECORD = "sinkquant-cache.json"  # sha256 of each file of a dequantized cache folder, written with it
ADD_BOS = "gguf_add_bos_token"  # the GGUF's flag, in the cache record and in LoadedModel.source
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model computes: its first parameter's device (a streamed model's placeholders sit on the CPU too)."""
    return next(model.parameters()).device


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


def gguf_add_bos(path: Path) -> bool | None:
    """`tokenizer.ggml.add_bos_token` from a GGUF file's metadata (None when absent): evidence that the model is
    trained with BOS (models.bos_evidence). Read once at load, before the weights: parsing a GGUF holds
    about 1.7x the file in memory for a moment."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    except Exception as exc:  # the reader raises many types for a damaged file
        raise SinkquantError(f"could not read GGUF file {path}: {_first_line(exc)}") from exc
    return None if field is None else bool(field.parts[field.data[0]][0])


def _read_gguf(path: Path, read: Callable[..., Any], **kwargs: Any) -> Any:
    """One of transformers' GGUF readers, its per-tensor log lines silenced and any failure one line."""
    quiet = logging.getLogger("transformers.modeling_gguf_pytorch_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return read(path.parent, gguf_file=path.name, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad file
        raise SinkquantError(f"could not read GGUF file {path}: {exc}") from exc
    finally:
        quiet.setLevel(level)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = _read_gguf(path, AutoModelForCausalLM.from_pretrained, dtype=dtype)
    tokenizer = _read_gguf(path, AutoTokenizer.from_pretrained)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def convert(spec: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write any loadable model (GGUF included) as a safetensors folder that from_pretrained reads."""
    check_output_dir(out, overwrite)
    loaded = load_model(spec)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return Path(out)


def _embedded_folder(entry: EmbeddedModel, dtype: torch.dtype) -> tuple[Path, str, bool | None]:
    """Dequantizing a GGUF takes ~30 s; do it once and keep a safetensors copy in the cache, with the sha256 of
    each file and the GGUF's `add_bos_token` (`gguf_add_bos` parses the whole file: 3-10 s). A copy that fails
    that check (corrupted, truncated, or written before hashes were recorded) is rebuilt, with one warning
    line; a record written before the flag was kept gets it added."""
    gguf = entry.path()
    digest = sha256_file(gguf)
    folder = cache_root() / "models" / f"{entry.name}-{digest[:16]}"
    problem = _cache_problem(folder)
    if problem is not None:
        if folder.exists():
            log.warning("sinkquant: rebuilding the model cache %s: %s", folder, problem)
        add_bos = gguf_add_bos(gguf)
        model, tokenizer = _load_gguf(gguf, dtype)
        with atomic_dir(folder, overwrite=True, owned=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            files = file_digests(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))
            atomic_write_json(tmp / CACHE_RECORD, {"gguf_sha256": digest, "files": files,
                                                   "versions": library_versions(), ADD_BOS: add_bos})
        return folder, digest, add_bos
    record = read_structured(folder / CACHE_RECORD, "model cache record")
    if not isinstance(record.get(ADD_BOS, ""), bool | None):
        record[ADD_BOS] = gguf_add_bos(gguf)
        atomic_write_json(folder / CACHE_RECORD, record)
    return folder, digest, record[ADD_BOS]


def _cache_problem(folder: Path) -> str | None:
    """What is wrong with a dequantized cache folder, or None when every file matches its recorded sha256."""
    if not (folder / CACHE_RECORD).is_file():
        return "it has no recorded hashes" if folder.exists() else "absent"
    try:
        record = read_structured(folder / CACHE_RECORD, "model cache record")
        verify_digests(folder, record.get("files") if isinstance(record, dict) else None, "model cache")
    except SinkquantError as exc:
        return str(exc)
    return None


def empty_model(folder: str | os.PathLike) -> PreTrainedModel:
    """The architecture saved in `folder`'s config.json, fp32, randomly initialised: the skeleton that a
    quantized state dict is loaded into."""
    if not (Path(folder) / "config.json").is_file():
        raise SinkquantError(f"{folder} has no config.json, which holds the model's architecture; the folder is "
                             "incomplete: write it again")
    return AutoModelForCausalLM.from_config(folder_config(Path(folder)), dtype=torch.float32).eval()


def random_model(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, spec: str) -> LoadedModel:
    """A randomly initialised fp32 model of `config`, normalized like a loaded one: for tests and memory
    benchmarks, which need an architecture's shapes, not trained weights."""
    model = normalize(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=spec,
                       source={"kind": "random", "model_type": config.model_type})


def _folder_digest(folder: Path) -> str:
    return "+".join(sha256_file(f)[:16] for f in sorted(folder.glob("*.safetensors")))


def is_artifact(path: str | os.PathLike) -> bool:
    """A folder written by `sinkquant quantize` (it holds sinkquant.json): loading only its weights as a plain
    model would silently drop its activation quantizers and prefix."""
    return (Path(path) / ARTIFACT_MANIFEST).is_file()


def _check_model_folder(path: Path) -> None:
    """Refuse a folder that is not a plain safetensors model, before transformers reads anything from it."""
    if is_artifact(path):
        raise SinkquantError(
            f"model folder {path} is a sinkquant artifact ({ARTIFACT_MANIFEST}), not a plain model; load it with "
            f"sinkquant.load({str(path)!r}) (its weights alone would drop its activation scales and prefix)"
        )
    if not (path / "config.json").is_file():
        raise SinkquantError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise SinkquantError(
            f"model folder {path} has {found}; sinkquant reads safetensors only, since a pickle can run code "
            "when loaded: use the model's safetensors release, or convert it where you trust its source"
        )


def _unknown_model(spec: str) -> SinkquantError:
    close = difflib.get_close_matches(spec, list(ZOO), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return SinkquantError(
        f"model {spec!r} is neither a folder with config.json, a .gguf file, a zoo name ({', '.join(ZOO)}), nor a "
        f"hub id owner/name like 'HuggingFaceTB/SmolLM2-135M'.{hint}"
    )


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """`spec` is a zoo name ('smollm2-135m' by default), a .gguf file, a local folder, or a hub id owner/name
    (needs internet, or HF_HUB_OFFLINE=1 and a copy in the hub cache). Anything else fails at once."""
    kind, where = _locate(spec)
    if kind == "embedded":
        folder, digest, add_bos = _embedded_folder(where, dtype)
        source = {"kind": "embedded", "gguf": where.filename, "sha256": digest, ADD_BOS: add_bos}
        model, tokenizer = _from_folder(folder, dtype, trust_remote_code)
    elif kind == "gguf":
        source = {"kind": "gguf", "path": str(where), "sha256": sha256_file(where), ADD_BOS: gguf_add_bos(where)}
        model, tokenizer = _load_gguf(where, dtype)
    elif kind == "folder":
        model, tokenizer = _from_folder(where, dtype, trust_remote_code)
        source = {"kind": "folder", "path": str(where), "sha256": _folder_digest(where)}
    else:
        model, tokenizer = _from_pretrained(spec, dtype, trust_remote_code, local=where is not None, hub=where)
        source = {"kind": "hub", "id": spec, "sha256": getattr(model.config, "_commit_hash", None) or "unknown"}
    adapter = adapter_for(model)
    normalize(model)
    model.eval()
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, source=source)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model(spec)` returns, read without any weights: a text too short for the windows a
    command needs is refused before the model loads (the embedded model's cache is built first if absent)."""
    kind, where = _locate(spec)
    if kind == "embedded":
        return folder_tokenizer(_embedded_folder(where, torch.float32)[0])
    if kind == "gguf":
        return _read_gguf(where, AutoTokenizer.from_pretrained)
    if kind == "folder":
        return folder_tokenizer(where, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code,
                                             local_files_only=where is not None)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, where is not None, where, exc) from exc


def _locate(spec: str) -> tuple[str, Any]:
    """What `spec` names, checked before anything is read: ('embedded', its EmbeddedModel), ('gguf', the file),
    ('folder', a plain safetensors model folder) or ('hub', why the hub is out of reach, None when it is not);
    anything else fails at once."""
    entry = embedded(spec)
    if entry is not None:
        return "embedded", entry
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SinkquantError(f"model file {path} does not exist (expected a readable .gguf file)")
        return "gguf", path
    if path.is_dir():
        _check_model_folder(path)
        return "folder", path
    if path.exists() or not HUB_ID.fullmatch(spec):
        raise _unknown_model(spec)
    return "hub", declared_offline() or unreachable()


def folder_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model, artifact or export folder."""
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SinkquantError(f"could not read the tokenizer in {folder}: {_first_line(exc)}") from exc


def _from_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local safetensors folder, its weights read into memory the process owns (`read_weights`); a model
    with remote code goes through from_pretrained as it is."""
    config = folder_config(folder)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if trust_remote_code or model_class is None:
        return _from_pretrained(str(folder), dtype, trust_remote_code, local=True)
    try:
        model = model_class.from_pretrained(None, config=config, state_dict=read_weights(folder), dtype=dtype)
        attach_saved_transforms(model, folder)  # a compressed-tensors folder's online rotations
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SinkquantError(f"could not load model folder {folder}: {_first_line(exc)}") from exc
    return model, tokenizer


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, read (pread, not mmap) into memory torch allocates.
    from_pretrained maps the file instead: a weight the engine then replaces (smoothed, rotated, quantized)
    stays mapped while any tensor of the file lives, so quantizing would hold the fp model twice; and
    tensors at the file's offsets are not 64-byte aligned, so the loaded model and a copy of it round
    differently in some kernels."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt", device="cpu", backend="pread") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    state[key] = handle.get_tensor(key).clone()  # one tensor at a time in two copies
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise SinkquantError(f"{file} is not a readable safetensors file: {_first_line(exc)}") from exc
    return state


def folder_config(folder: Path) -> PretrainedConfig:
    """A model folder's config.json, without its weights."""
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:  # transformers raises either for a damaged config.json
        raise SinkquantError(f"{folder / 'config.json'} is not a readable model config: {_first_line(exc)}") \
            from exc


def _from_pretrained(
    spec: str, dtype: torch.dtype, trust_remote_code: bool, local: bool, hub: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """safetensors only (a pickle is never opened); `hub` says why the hub is out of reach when `spec` is a hub
    id that must come from the local hub cache."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, local, hub, exc) from exc
    return model, tokenizer


def _load_error(spec: str, local: bool, hub: str | None, exc: OSError | ValueError) -> SinkquantError:
    if isinstance(exc, ValueError):
        return SinkquantError(f"could not load model {spec!r}: {_first_line(exc)}")
    if hub is not None:
        return SinkquantError(
            f"could not load model {spec!r}: {hub}, and it is neither in the local hub cache nor a folder here; "
            f"pass a local folder, a .gguf file or a zoo name ({', '.join(ZOO)})")
    where = "local folder" if local else "hub id"
    return SinkquantError(f"could not load model {spec!r} as a {where}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _template_starts_with_bos(loaded: LoadedModel) -> bool | None:
    """Does the chat template put BOS first? None when the tokenizer has no template or it cannot render."""
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    except Exception:  # templates raise arbitrary errors (e.g. on a missing system turn)
        return None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids) > 0 and ids[0] == loaded.bos_id


def bos_evidence(loaded: LoadedModel) -> dict[str, Any]:
    """Whether the model is trained with its BOS token, and the evidence: the tokenizer adds it, the GGUF
    metadata says so, or the chat template starts with it. Any one suffices; a BOS id alone does not."""
    if loaded.bos_id is None:
        return {"bos_id": None, "trained": False, "evidence": "the tokenizer defines no BOS token"}
    facts = {"tokenizer_adds_bos": loaded.adds_bos, "gguf_add_bos_token": loaded.source.get(ADD_BOS),
             "chat_template_starts_with_bos": _template_starts_with_bos(loaded)}
    yes = [name for name, value in facts.items() if value]
    return {"bos_id": loaded.bos_id, "bos_token": loaded.tokenizer.decode([loaded.bos_id]), **facts,
            "trained": bool(yes), "evidence": ", ".join(yes) or "none of tokenizer, GGUF metadata, chat template"}

