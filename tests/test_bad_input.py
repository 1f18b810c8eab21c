"""Issue 16, the cases of a hostile but realistic user against models, data, structured files, output folders
and the compare cache: each is one error line (exit 2 through the CLI) with no traceback, no silent wrong result
and nothing left behind."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sinkquant.cli import main
from sinkquant.comparison import compare
from sinkquant.errors import SinkquantError
from sinkquant.io import (
    MAX_STRUCTURED_BYTES,
    atomic_dir,
    atomic_write_json,
    check_output_file,
    code_sha256,
    file_digests,
    read_manifest,
    read_structured,
    verify_digests,
)
from sinkquant.models import _cache_problem, cache_root, empty_model, is_artifact, load_model
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parent.parent


def one_line_error(code: int, capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI refused with exit 2 and exactly one stderr line that is not a traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def left_behind(out: Path) -> list[str]:
    """`out` itself and any hidden temp sibling of it."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


# --- models -------------------------------------------------------------------------------------------------------


def model_folder(tmp_path: Path, kind: str) -> Path:
    """A folder a user might pass as --model: an artifact, or a model with only pickle weights."""
    folder = tmp_path / kind
    tiny_config("llama").save_pretrained(folder)
    if kind == "artifact":
        (folder / "sinkquant.json").write_text(json.dumps({"format_version": 1}))
        (folder / "model.safetensors").write_bytes(b"")
    else:
        torch.save({"lm_head.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(("kind", "message"), [
    # eval reads an artifact folder as the artifact it is: this one, of an old format, is refused by the loader
    ("artifact", "format_version 1; this sinkquant reads 2"),
    ("pickle", "has only pickle weights (pytorch_model.bin); sinkquant reads safetensors only"),
])
def test_model_folder_refused(kind, message, tmp_path, capsys) -> None:
    folder = model_folder(tmp_path, kind)
    assert is_artifact(folder) == (kind == "artifact")
    err = one_line_error(main(["eval", "--quiet", "--model", str(folder)]), capsys)
    assert message in err and "weights_only" not in err


def test_artifact_is_not_a_plain_model(tmp_path) -> None:
    folder = model_folder(tmp_path, "artifact")
    with pytest.raises(SinkquantError, match=r"is a sinkquant artifact \(sinkquant.json\), not a plain model; "
                                             r"load it with sinkquant.load\("):
        load_model(str(folder))


@pytest.mark.parametrize(("spec", "message"), [
    ("smolm2-135m", "Did you mean 'smollm2-135m'?"),
    ("gpt2-large-typo", "nor a hub id owner/name"),
    ("a/b/c", "nor a hub id owner/name"),
])
def test_mistyped_model_name_fails_at_once(spec, message, capsys) -> None:
    start = time.perf_counter()
    err = one_line_error(main(["eval", "--quiet", "--model", spec]), capsys)
    assert time.perf_counter() - start < 2.0
    assert message in err and "a zoo name (smollm2-135m" in err


def test_hub_model_declared_offline_fails_at_once(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    err = one_line_error(main(["eval", "--quiet", "--model", "nobody-sinkquant/no-such-model"]), capsys)
    assert time.perf_counter() - start < 5.0
    assert "HF_HUB_OFFLINE is set, and it is neither in the local hub cache nor a folder here" in err


UNREACHABLE = """
import sys, time
from sinkquant.errors import SinkquantError
from sinkquant.{module} import {function}
start = time.perf_counter()
try:
    {function}("nobody-sinkquant/nothing")
except SinkquantError as exc:
    print(f"{{time.perf_counter() - start:.2f}}\\n{{exc}}")
"""


@pytest.mark.parametrize(("module", "function"), [("models", "load_model"), ("data", "load_text")])
def test_unreachable_hub_fails_at_once(module, function, tmp_path) -> None:
    """An endpoint nobody listens on, no offline variable: one connect check instead of ~30-40 s of retries.
    A subprocess, since the libraries read HF_ENDPOINT when imported; only the call is timed, not the imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = UNREACHABLE.format(module=module, function=function)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    seconds, message = proc.stdout.strip().split("\n")
    assert "the hub (127.0.0.1:9) is unreachable: Connection refused" in message
    assert float(seconds) < 5.0


@pytest.mark.slow
def test_corrupted_model_cache_is_rebuilt(smollm2, tmp_path, monkeypatch, caplog) -> None:
    """The dequantized copy of the embedded GGUF is checked against the sha256 recorded when it was written."""
    real = next((cache_root() / "models").glob("smollm2-135m-*"))
    assert _cache_problem(real) is None  # the session fixture left a verified cache
    monkeypatch.setenv("SINKQUANT_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "cache" / "models" / real.name
    shutil.copytree(real, copy)
    assert _cache_problem(copy) is None
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(1 << 20)
        handle.write(b"\xff" * (64 << 10))
    assert "model.safetensors has changed since it was written" in _cache_problem(copy)
    with caplog.at_level(logging.WARNING, logger="sinkquant.models"):
        loaded = load_model("smollm2-135m")
    assert "rebuilding the model cache" in caplog.text and "model.safetensors has changed" in caplog.text
    assert _cache_problem(copy) is None
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, smollm2.model(ids).logits)


# --- data ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "message"), [
    ("folder.txt", None, "is a folder; pass a file"),
    ("bad.txt", b"plain words \xff more words", "is not valid UTF-8: byte 0xff at byte offset 12"),
    ("bad.jsonl", b'{"text": "caf\xc3\xa9"}\n{"text": "\xc3("}\n', "not valid UTF-8: byte 0xc3 at byte offset 28"),
    ("cut.txt", "d\u00e9j\u00e0".encode()[:-1], "ends inside a character that starts at byte offset 4"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "could not read data file"),
])
def test_bad_data_file(name, content, message, tmp_path, capsys) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    err = one_line_error(main(["eval", "--quiet", "--data", str(path)]), capsys)
    assert message in err and str(path) in err
    assert "An error occurred while generating the dataset" not in err


def test_profile_ctx_zero_is_one_line(tmp_path, capsys, wikitext_path) -> None:
    """Profiling plans its own windows; ctx 0 used to be a ZeroDivisionError in TokenStream.n_windows."""
    out = tmp_path / "profile"
    err = one_line_error(main(["profile", "--quiet", "--data", str(wikitext_path), "--ctx", "0", "--out", str(out)]),
                         capsys)
    assert "argument --ctx: 0 is below 2" in err
    assert left_behind(out) == []


# --- recipes and baselines (read_structured) ----------------------------------------------------------------------


def structured(tmp_path: Path, case: str) -> Path:
    """A recipe / baseline file as an attacker or an accident would write it."""
    suffix = ".json" if "json" in case else ".yaml"
    path = tmp_path / f"{case}{suffix}"
    if case == "folder":
        path.mkdir()
    elif case == "utf8":
        path.write_bytes(b"name: caf\xe9\n")
    elif case == "deep-yaml":
        path.write_text("[" * 50_000 + "]" * 50_000)
    elif case == "deep-json":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "huge":
        path.write_text("name: x\n" + "# padding\n" * (MAX_STRUCTURED_BYTES // 10 + 1))
    elif case == "laughs":
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
        path.write_text("\n".join(lines) + "\n")
    elif case == "self":
        path.write_text("&a [*a]\n")
    elif case == "nested-json":
        path.write_text("[" * 65 + "]" * 65)
    return path


STRUCTURED_CASES = [
    ("folder", "is a folder; pass a .yaml or .json file"),
    ("utf8", "is not valid UTF-8: byte 0xe9 at byte offset 9"),
    ("deep-yaml", "nests deeper than the YAML parser can follow"),
    ("deep-json", "nests deeper than the JSON parser can follow"),
    ("huge", f"bytes; recipe files are limited to {MAX_STRUCTURED_BYTES:,} bytes"),
    ("laughs", "expands to more than 1,000,000 values (YAML aliases)"),
    ("self", "refers to itself (a recursive YAML alias)"),
    ("nested-json", "nests deeper than 64 levels"),
]


@pytest.mark.parametrize(("case", "message"), STRUCTURED_CASES)
def test_bad_recipe_file(case, message, tmp_path, capsys) -> None:
    recipe, out = structured(tmp_path, case), tmp_path / "artifact"
    start = time.perf_counter()
    err = one_line_error(main(["quantize", "--quiet", "--recipe", str(recipe), "--out", str(out)]), capsys)
    assert time.perf_counter() - start < 5.0
    assert message in err and str(recipe) in err
    assert left_behind(out) == []


@pytest.mark.parametrize(("case", "message"), [c for c in STRUCTURED_CASES if c[0] != "huge"])
def test_bad_baseline_file(case, message, tmp_path) -> None:
    with pytest.raises(SinkquantError, match="baseline") as info:
        read_structured(structured(tmp_path, case), "baseline")
    assert message.replace("recipe", "baseline") in str(info.value)


def test_structured_file_at_the_limits_still_parses(tmp_path) -> None:
    path = tmp_path / "ok.json"
    path.write_text("[" * 64 + "]" * 64)
    assert read_structured(path, "recipe") == eval("[" * 64 + "]" * 64)  # noqa: S307 - a literal we built
    shared = tmp_path / "shared.yaml"
    shared.write_text("base: &b {bits: 8}\nweights: *b\nkv: *b\n")
    assert read_structured(shared, "recipe")["kv"] == {"bits": 8}


# --- output folders -----------------------------------------------------------------------------------------------


def out_case(tmp_path: Path, case: str) -> Path:
    if case == "file-exists":
        (tmp_path / "report").write_text("a file, not a folder")
        return tmp_path / "report"
    if case == "under-file":
        (tmp_path / "notes.txt").write_text("x")
        return tmp_path / "notes.txt" / "report"
    if case == "read-only":
        if os.geteuid() == 0:
            return Path("/proc/sinkquant-report")  # no one, root included, may create a folder here
        place = tmp_path / "locked"
        place.mkdir(mode=0o555)
        return place / "report"
    raise ValueError(case)


@pytest.mark.parametrize(("case", "message"), [
    ("file-exists", "exists and is a file; pass a folder path"),
    ("under-file", "notes.txt, which is a file, not a folder"),
    ("read-only", "cannot write in"),
])
@pytest.mark.parametrize("command", ["profile", "quantize", "convert"])
def test_unwritable_out_fails_before_any_work(command, case, message, tmp_path, capsys) -> None:
    out = out_case(tmp_path, case)
    args = {"profile": ["profile", "--quiet"], "convert": ["convert"],
            "quantize": ["quantize", "--quiet", "--recipe", str(REPO / "recipes/w8a8-naive.yaml")]}[command]
    start = time.perf_counter()
    err = one_line_error(main([*args, "--model", "no-such-model-is-loaded", "--out", str(out), "--overwrite"]),
                         capsys)
    assert time.perf_counter() - start < 2.0  # refused before the (bad) model name is even looked at
    assert message in err
    assert left_behind(out) == ([out.name] if case == "file-exists" else [])


@pytest.mark.parametrize("case", ["file-exists", "under-file", "read-only"])
def test_unwritable_compare_out_fails_before_the_recipes_run(case, tmp_path, capsys, wikitext_path) -> None:
    out = out_case(tmp_path, case)
    start = time.perf_counter()
    code = main(["compare", "--quiet", "--recipes", str(REPO / "recipes/w8a8-naive.yaml"), "--data",
                 str(wikitext_path), "--ctx", "64", "--out", str(out)])
    err = one_line_error(code, capsys)
    assert time.perf_counter() - start < 30.0  # the model and text load (a few s), no recipe runs (minutes)
    assert err.startswith("sinkquant compare: error: compare cache ") and str(out) in err
    assert left_behind(out) == ([out.name] if case == "file-exists" else [])


@pytest.mark.parametrize(("case", "message"), [
    ("file-exists", None),
    ("under-file", "notes.txt, which is a file, not a folder"),
    ("read-only", "cannot write in"),
])
def test_output_file_place_is_checked(case, message, tmp_path) -> None:
    """For `eval --out result.json`: a file path, so an existing file is fine (it is replaced), a folder is not."""
    out = out_case(tmp_path, case)
    if message is None:
        assert check_output_file(out) == out
        with pytest.raises(SinkquantError, match="is a folder; pass a file path"):
            check_output_file(tmp_path)
    else:
        with pytest.raises(SinkquantError, match=message):
            check_output_file(out)


@pytest.mark.parametrize(("case", "message"), [
    ("under-file", "Not a directory"),
    ("read-only", "(No such file or directory|Permission denied|Read-only file system)"),
])
def test_atomic_write_failure_is_one_error(case, message, tmp_path) -> None:
    """The backstop when a caller did not check its output place first: an error line, no temp file left."""
    out = out_case(tmp_path, case)
    if case == "under-file":
        out = out / "eval.json"  # notes.txt/report/eval.json
    with pytest.raises(SinkquantError, match=rf"^cannot write {re.escape(str(out))}: {message}"):
        atomic_write_json(out, {"ppl": 1.0})
    assert left_behind(out) == []


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_overwrite_of_the_current_directory_is_refused(out, tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    err = one_line_error(main(["profile", "--quiet", "--out", out, "--overwrite"]), capsys)
    assert "is or contains the current directory" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "sub", "work"]


def test_stale_temp_folders_of_a_killed_run_are_removed(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "report"
    stale = [f".report.{dead.stdout.strip()}.k3j2h1.partial", ".report.old", ".report.abc123.partial"]
    kept = [f".report.{os.getpid()}.live00.partial", ".reports.1.x.partial", ".other.old"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text("{}")
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report", *kept])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(umask, tmp_path) -> None:
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "artifact") as tmp:
            atomic_write_json(tmp / "sinkquant.json", {"ok": True})
        report = atomic_write_json(tmp_path / "eval.json", {"ppl": 1.0})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "artifact").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "artifact" / "sinkquant.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(report.stat().st_mode) == 0o666 & ~umask
    report.chmod(0o640)
    atomic_write_json(report, {"ppl": 2.0})  # a rewrite keeps the mode the user gave the file
    assert stat.S_IMODE(report.stat().st_mode) == 0o640


# --- integrity helpers for manifests ------------------------------------------------------------------------------


def test_digests_name_the_missing_or_changed_file(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4096)
    (tmp_path / "recipe.yaml").write_text("name: w8a8\n")
    digests = file_digests(tmp_path, ["model.safetensors", "recipe.yaml"])
    verify_digests(tmp_path, digests, "artifact")
    with open(tmp_path / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff")
    with pytest.raises(SinkquantError, match=r"^artifact: .*model.safetensors has changed since it was written"):
        verify_digests(tmp_path, digests, "artifact")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SinkquantError, match=r"model.safetensors is missing$"):
        verify_digests(tmp_path, digests, "artifact")
    for tampered in ([1, 2], {"recipe.yaml": 3}, None):
        with pytest.raises(SinkquantError, match="must map file names to sha256 strings"):
            verify_digests(tmp_path, tampered, "artifact")
    with pytest.raises(SinkquantError, match="is outside"):
        verify_digests(tmp_path, {"../recipe.yaml": digests["recipe.yaml"]}, "artifact")


@pytest.mark.parametrize(("manifest", "message"), [
    ("[1, 2]", "holds a JSON list; a sinkquant manifest is a JSON object"),
    ('"w8a8"', "holds a JSON str"),
    ("{", "is not valid JSON"),
])
def test_tampered_manifest_is_one_error(manifest, message, tmp_path) -> None:
    (tmp_path / "sinkquant.json").write_text(manifest)
    with pytest.raises(SinkquantError, match=message):
        read_manifest(tmp_path, "sinkquant.json", "not an artifact")


@pytest.mark.parametrize(("config", "message"), [
    (None, "has no config.json, which holds the model's architecture"),
    ("{", "is not a readable model config"),
    ('{"model_type": "no-such-architecture"}', "is not a readable model config"),
])
def test_damaged_config_is_one_error(config, message, tmp_path) -> None:
    """An artifact's skeleton comes from its config.json (the tampered-artifact cases without one)."""
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(SinkquantError, match=message):
        empty_model(tmp_path)


# --- compare cache ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"recipe": "fp32", "status": "ok", "ppl": 1', "unreadable"),
    (b"\xff\xfe", "unreadable"),
    (b"[1, 2]", "holds a JSON list"),
    (b'{"recipe": "fp32", "description": "", "status": "ok", "ppl": 1.0, "colour": "red"}', "unknown fields"),
    (b'{"recipe": "fp32", "description": "", "status": "ok", "ppl": "1.0"}', "field 'ppl' is '1.0'"),
    (b'{"recipe": "fp32", "description": "", "status": "ok", "ppl": null}', "status 'ok' with ppl None"),
])
def test_corrupted_compare_cache_row_is_recomputed(content, reason, smollm2, wikitext_stream, tmp_path,
                                                   caplog) -> None:
    cache = tmp_path / "cache"
    first = compare(smollm2, [], wikitext_stream, ctx=32, max_windows=1, cache_dir=cache, progress=False)
    [row_file] = cache.iterdir()
    row_file.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sinkquant.comparison"):
        again = compare(smollm2, [], wikitext_stream, ctx=32, max_windows=1, cache_dir=cache, progress=False)
    assert f"ignoring the cache row {row_file} ({reason}" in caplog.text
    assert not again["rows"][0]["cached"] and again["rows"][0]["ppl"] == first["rows"][0]["ppl"]
    assert json.loads(row_file.read_text())["ppl"] == first["rows"][0]["ppl"]  # rewritten whole
    assert again["code_sha256"] == code_sha256()


def test_code_hash_changes_with_any_source_file(tmp_path) -> None:
    """The compare cache key holds this hash, so a row computed by other code is never reused."""
    copy = tmp_path / "sinkquant"
    shutil.copytree(REPO / "sinkquant", copy, ignore=shutil.ignore_patterns("__pycache__"))

    def hash_of(root: Path) -> str:
        spec = importlib.util.spec_from_file_location("io_copy", root / "io.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.code_sha256()

    assert hash_of(copy) == code_sha256()
    with open(copy / "perplexity.py", "a") as handle:
        handle.write("# a one-line change\n")
    assert hash_of(copy) != code_sha256()


def test_eval_refuses_an_unwritable_out_before_evaluating(unloadable_model, tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = one_line_error(main(["eval", "--quiet", "--model", str(unloadable_model), "--out",
                               str(blocker / "eval.json")]), capsys)
    assert str(blocker) in err and "safetensors" not in err  # refused before the (unreadable) weights load


@pytest.fixture()
def unloadable_model(smollm2, tmp_path) -> Path:
    """The embedded model's config and tokenizer beside weights that cannot be read: any command that loads the
    weights fails on them, so an error about something else shows that it came first."""
    real = next((cache_root() / "models").glob("smollm2-135m-*"))
    folder = tmp_path / "model"
    folder.mkdir()
    for file in real.iterdir():
        if file.suffix != ".safetensors" and file.is_file():
            shutil.copy(file, folder / file.name)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


STATIC_RECIPE = str(REPO / "recipes" / "w8a8-prefix-smooth-except.yaml")


@pytest.mark.parametrize(("command", "flags", "needs"), [
    ("eval", [], "needs 1 ("),
    ("quantize", ["--recipe", STATIC_RECIPE, "--calib-windows", "1", "--stream", "never"], "needs 2 ("),
    ("compare", ["--recipes", STATIC_RECIPE, "--calib-windows", "1"], "needs 2 ("),
    ("profile", ["--calib-windows", "1", "--overwrite"], "needs 1 (--calib-windows)"),
])
def test_a_text_too_short_in_tokens_is_refused_before_the_model_loads(command, flags, needs, unloadable_model,
                                                                        tmp_path, capsys) -> None:
    """Enough bytes to pass the check before torch (a token covers at least a byte), too few tokens for one
    window: refused after the tokenizer alone is read, before the (unreadable) weights are."""
    text = tmp_path / "short.txt"
    text.write_text("hello " * 30)  # 180 bytes, about 30 tokens
    out = tmp_path / "out"
    err = one_line_error(main([command, "--quiet", "--model", str(unloadable_model), "--data", str(text),
                               "--ctx", "64", *flags, "--out", str(out if command != "eval" else out / "e.json")]),
                         capsys)
    assert f"windows of --ctx 64; this run {needs}" in err and "safetensors" not in err, err
    assert not out.exists()


def test_an_artifact_is_not_loaded_for_a_text_too_short_in_tokens(smollm2, tmp_path, capsys) -> None:
    """The artifact's manifest comes first (its files listed), then its tokenizer and the text; with --no-verify
    an unreadable weight file shows the text was refused before the weights were read."""
    text = tmp_path / "short.txt"
    text.write_text("hello " * 30)
    art = tmp_path / "art"
    assert main(["quantize", "--quiet", "--recipe", str(REPO / "recipes" / "w8a8-naive.yaml"), "--ctx", "16",
                 "--max-windows", "1", "--calib-windows", "1", "--out", str(art)]) == 0
    capsys.readouterr()
    weights = next(art.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    err = one_line_error(main(["eval", "--quiet", "--model", str(art), "--data", str(text), "--ctx", "64",
                               "--no-verify"]), capsys)
    assert "windows of --ctx 64; this run needs 2 (" in err and "safetensors" not in err, err
