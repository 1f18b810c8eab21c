"""Issue 31, a hostile user's cases: --overwrite never deletes what sinkquant did not write, everything a load
reads is verified, step orders and baselines that would be silently wrong are refused, integers have ranges, and
every refusal that needs no model comes before torch is imported (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkquant.backends.export.compressed_tensors import MANIFEST, PREFIX_KV, PREFIX_META, load_prefix_cache
from sinkquant.engine import apply_recipe, load, save
from sinkquant.errors import SinkquantError
from sinkquant.io import OUTPUT_MARKER, atomic_dir, check_output_dir, sha256_file
from sinkquant.recipe import check_recipe, load_recipe, parse_recipe
from sinkquant.regression import read_baseline
from sinkquant.steps import SPECS, STEPS
from tests.test_recipes_apply import tiny_artifact  # noqa: F401  (fixture)
from tests.tiny import tiny_config, tiny_folder, tiny_model

REPO = Path(__file__).resolve().parent.parent
W8A8 = {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}}
NAIVE = str(REPO / "recipes" / "w8a8-naive.yaml")
# The CLI in a fresh interpreter; prints whether torch was imported by the time it returned.
CLI = "import sys\nfrom sinkquant.cli import main\nrc = main(sys.argv[1:])\nprint('torch' in sys.modules)\nsys.exit(rc)"


def refused_before_torch(args: list[str], **env: str) -> str:
    """The command's one error line; it exited 2 before importing torch (so in well under a second)."""
    proc = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=REPO)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "False", f"torch was imported before the refusal: {lines}"
    return lines[0]


def write_recipe(tmp_path: Path, steps: list, scheme: dict | None = None, **fields) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"name": "r", "description": "d", "steps": steps, "scheme": scheme or W8A8, **fields}))
    return str(path)


# --- output folders: --overwrite replaces only what sinkquant wrote ----------------------------------------------


def test_overwrite_replaces_a_sinkquant_folder_and_keeps_file_modes(tmp_path) -> None:
    out = tmp_path / "out"
    for _ in range(2):  # the second write replaces the first: it holds sinkquant's marker
        with atomic_dir(out, overwrite=True) as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
    assert (out / OUTPUT_MARKER).is_file()
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", overwrite=True) == tmp_path / "empty"  # nothing there to lose


@pytest.mark.parametrize("command", [
    ["quantize", "--recipe", NAIVE, "--model", "no-such-model"], ["convert", "--model", "no-such-model"],
    ["profile", "--model", "no-such-model"], ["export", "ARTIFACT"],
])
def test_overwrite_refuses_a_folder_sinkquant_did_not_write(command, tmp_path) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "sinkquant.json").write_text("{}")
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years")
    args = [str(artifact) if a == "ARTIFACT" else a for a in command]
    err = refused_before_torch([*args, "--out", str(mine), "--overwrite"])
    assert f"output folder {mine} was not written by sinkquant" in err
    assert (mine / "thesis.tex").read_text() == "three years"


@pytest.mark.parametrize(("where", "message"), [
    ("home", "is or contains the home folder"),
    ("parent", "is or contains the home folder"),
    ("/etc", "is a system folder"),
    ("/", "is or contains the current directory"),
])
def test_overwrite_never_replaces_home_or_system_folders(where, message, tmp_path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("key")
    (home / OUTPUT_MARKER).write_text("")  # even a folder that looks like sinkquant's
    out = {"home": home, "parent": tmp_path}.get(where, Path(where))
    err = refused_before_torch(["convert", "--out", str(out), "--overwrite"], HOME=str(home))
    assert message in err and str(out) in err
    assert (home / ".ssh" / "id_rsa").read_text() == "key"


@pytest.mark.parametrize("out", ["artifact", ".", "artifact/sub"])
def test_export_never_replaces_the_artifact_it_reads(out, tmp_path) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "sinkquant.json").write_text("{}")
    (artifact / OUTPUT_MARKER).write_text("")
    target = tmp_path / out
    err = refused_before_torch(["export", str(artifact), "--out", str(target), "--overwrite"])
    assert "which this command reads" in err
    assert sorted(p.name for p in artifact.iterdir()) == sorted([OUTPUT_MARKER, "sinkquant.json"])


# --- parse-time refusals, all before torch ---------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "message"), [
    ([{"prefix": {"tokens": ["\n"]}}, {"rotate": {}}], "steps[1] (rotate): changes what steps[0] (prefix) computed"),
    ([{"smooth": {}}, {"rotate": {}}], "steps[1] (rotate): changes what steps[0] (smooth) computed"),
    ([{"smooth": {}}, {"prefix": {}}], "steps[1] (prefix): changes what steps[0] (smooth) computed"),
    ([{"smooth": {}}, {"act": {}}], "steps[1] (act): changes what steps[0] (smooth) computed"),
    ([{"act": {}}, {"prefix": {}}], "steps[1] (prefix): changes what steps[0] (act) computed"),
    ([{"clip": {}}, {"exceptions": {"top": 1}}], "steps[1] (exceptions): changes what steps[0] (clip) computed"),
    ([{"keep_sink": {"positions": [1e21]}}], "steps[0].keep_sink.positions.0"),
    ([{"keep_sink": {"positions": [2 ** 40]}}], "less than or equal to 1048576"),
    ([{"rotate": {"seed": 1e29}}], "steps[0].rotate.seed"),
    ([{"rotate": {"seed": -1}}], "greater than or equal to 0"),
    ([{"clip": {"samples": 10 ** 9}}], "steps[0].clip.samples"),
    ([{"exceptions": {"top": 10 ** 12}}], "steps[0].exceptions.top"),
    ([{"prefix": {"tokens": [10 ** 12]}}], "steps[0].prefix.tokens"),
])
def test_silently_wrong_orders_and_huge_integers_are_refused(steps, message, tmp_path) -> None:
    with pytest.raises(SinkquantError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        check_recipe({"name": "r", "description": "d", "steps": steps, "scheme": W8A8})


@pytest.mark.parametrize(("scheme", "calibration", "message"), [
    ({"weights": {"bits": 4, "gptq": {"block_size": 1e12}}}, {}, "scheme.weights.gptq.block_size"),
    ({"weights": {"bits": 4, "granularity": "group", "group_size": 10 ** 9}}, {}, "scheme.weights.group_size"),
    (W8A8, {"windows": 10 ** 9}, "calibration.windows"),
    (W8A8, {"ctx": 10 ** 9}, "calibration.ctx"),
])
def test_scheme_integers_have_ranges(scheme, calibration, message) -> None:
    with pytest.raises(SinkquantError, match=message):
        check_recipe({"name": "r", "description": "d", "scheme": scheme, "calibration": calibration})


def test_every_shipped_and_searched_recipe_still_parses() -> None:
    for path in [*(REPO / "recipes").glob("*.yaml"), *(REPO / "eval" / "results").rglob("*.yaml")]:
        load_recipe(path)


def test_one_registry_of_step_names() -> None:
    """The parse-time rules and the steps that do the work are one set of classes: each step subclasses its spec."""
    assert set(SPECS) == {"act", "clip", "exceptions", "keep_sink", "prefix", "rotate", "smooth"} <= set(STEPS)
    assert all(issubclass(STEPS[name], SPECS[name]) for name in SPECS)


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "does not exist"),
    ("fifo", "is not a regular file (a fifo, device or socket)"),
    ("/dev/zero", "is not a regular file"),
    ("order", "changes what steps[0] (prefix) computed (its KV)"),
    ("scheme-with-file", "--scheme only applies to --recipe auto"),
    ("budget-with-file", "--budget only applies to --recipe auto"),
    ("max-exceptions-with-file", "--max-exceptions only applies to --recipe auto"),
    ("auto-calib-1", "pass --calib-windows 3 or more"),
    ("auto-bad-scheme", "is not a base scheme for --recipe auto"),
    ("auto-bad-budget", "budget=-1.0 is not valid"),
])
def test_recipe_and_flag_refusals_come_before_torch(case, message, tmp_path) -> None:
    recipe = {"missing": str(tmp_path / "missing.yaml"), "/dev/zero": "/dev/zero", "fifo": str(tmp_path / "fifo"),
              "order": write_recipe(tmp_path, [{"prefix": {}}, {"rotate": {}}])}.get(case, NAIVE)
    if case == "fifo":
        os.mkfifo(recipe)
    flags = {"scheme-with-file": ["--scheme", "w4a8kv8"], "budget-with-file": ["--budget", "0.01"],
             "max-exceptions-with-file": ["--max-exceptions", "4"], "auto-calib-1": ["--calib-windows", "1"],
             "auto-bad-scheme": ["--scheme", "w3a3"], "auto-bad-budget": ["--budget", "-1"]}.get(case, [])
    if case.startswith("auto"):
        recipe = "auto"
    err = refused_before_torch(["quantize", "--recipe", recipe, *flags, "--out", str(tmp_path / "out")])
    assert message in err
    assert not (tmp_path / "out").exists()


def test_export_format_is_refused_before_torch(tmp_path) -> None:
    err = refused_before_torch(["export", str(tmp_path / "art"), "--format", "gguf", "--out", str(tmp_path / "o")])
    assert "--format 'gguf' is not valid; valid: compressed-tensors, onnx" in err


def test_auto_flags_without_an_auto_recipe_are_refused_by_compare(tmp_path) -> None:
    err = refused_before_torch(["compare", "--recipes", NAIVE, "--budget", "0.01", "--out", str(tmp_path / "c")])
    assert "--budget only applies to --recipe auto" in err


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.txt", b"", "is empty"),
    ("three.txt", b"one two three", "shorter than one window of ctx=512"),
    ("binary.raw", b"\x00\x01\xfe\xff" * 64, "is not valid UTF-8"),
    ("rows.jsonl", b'{"body": "text"}\n', "has no field 'text'; fields: body"),
    ("rows.jsonl", b'["a list"]\n', "line 1 is a JSON list"),
    ("fake.parquet", b"this is no parquet file at all", "is not a parquet file"),
])
@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_bad_data_files_are_refused_before_torch(command, name, content, message, tmp_path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    extra = ["--recipe", NAIVE, "--out", str(tmp_path / "out")] if command == "quantize" else []
    err = refused_before_torch([command, *extra, "--data", str(path)])
    assert message in err and str(path) in err


def test_too_few_bytes_for_the_calibration_windows_is_refused_before_torch(tmp_path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("word " * 300)  # 1500 bytes: one window of 512 fits, 8 calibration windows do not
    err = refused_before_torch(["quantize", "--recipe", NAIVE, "--data", str(path), "--out", str(tmp_path / "o")])
    assert "too few for 9 windows of ctx=512" in err


def test_quiet_silences_upstream_progress_bars() -> None:
    code = ("from sinkquant.cli.noise import quiet_libraries\nquiet_libraries(True)\nfrom tqdm import tqdm\n"
            "list(tqdm(range(3), desc='Decompressing model'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})
    assert proc.returncode == 0 and "Decompressing" not in proc.stderr, proc.stderr


# --- regression baselines cannot widen their own tolerance --------------------------------------------------------


@pytest.mark.parametrize(("kernels", "message"), [
    ({"AVX2": {"ppl": 137.0, "fp32_ppl": 50.0}, "BOGUS": {"ppl": 0.001, "fp32_ppl": 50.0}},
     "'BOGUS' is not a CPU kernel path"),
    ({"AVX2": {"ppl": 100.0, "fp32_ppl": 50.0}, "AVX512": {"ppl": 130.0, "fp32_ppl": 50.0}},
     "would exceed the 50% maximum"),
])
def test_baseline_kernels_cannot_widen_the_tolerance(kernels, message, tmp_path) -> None:
    source = REPO / "eval" / "baselines" / "w8a8-naive.json"
    path = tmp_path / source.name
    path.write_text(json.dumps({**json.loads(source.read_text()), "kernels": kernels, "ppl": 5000.0}))
    with pytest.raises(SinkquantError, match=message):
        read_baseline(path)


# --- loads read only what the manifest covers ----------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["tokenizer", "unlisted-prefix", "unlisted-file"])
@pytest.mark.parametrize("verify", [True, False])
def test_artifact_files_outside_the_manifest_are_refused(tiny_artifact, tmp_path, tamper, verify) -> None:  # noqa: F811
    folder = Path(shutil.copytree(tiny_artifact, tmp_path / "copy"))
    if tamper == "tokenizer":
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
        if not verify:
            pytest.skip("--no-verify skips the sha256 of listed files by design")
        message = "tokenizer.json has changed since it was written"
    else:
        name = "prefix2.safetensors" if tamper == "unlisted-prefix" else "notes/extra.json"
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copy(folder / "prefix.safetensors", folder / name)
        message = f"{name} is not listed in"
    with pytest.raises(SinkquantError, match=message):
        load(folder, verify=verify)


def test_every_artifact_file_is_listed(tiny_artifact) -> None:  # noqa: F811
    manifest = json.loads((tiny_artifact / "sinkquant.json").read_text())
    on_disk = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"sinkquant.json"}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", OUTPUT_MARKER} <= set(manifest["files"])


def test_peer_backend_artifact_is_pickle_free_and_verified(smollm2, tmp_path) -> None:
    """torchao's tensor subclasses go through its safetensors flattening; the backend's config is covered."""
    from sinkquant.data import TokenStream

    loaded = tiny_model("llama", smollm2.tokenizer)
    stream = TokenStream(ids=torch.randint(3, 5000, (64 * 4,), generator=torch.Generator().manual_seed(0)),
                         text_sha256="random", source={})
    recipe = parse_recipe({"name": "tao", "description": "d", "backend": "torchao-int8wo",
                           "calibration": {"windows": 1}})
    quantized = apply_recipe(loaded, recipe, stream, ctx=64)
    folder = save(quantized, tmp_path / "tao")
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    assert not any(n.endswith((".pt", ".bin", ".pkl", ".pth")) for n in files), files
    ids = stream.windows(64, [0])
    with torch.no_grad():
        assert torch.equal(load(folder).model(input_ids=ids).logits, quantized.model(input_ids=ids).logits)
    config = json.loads((folder / "backend" / "config.json").read_text())
    config["rms_norm_eps"] = 0.1
    (folder / "backend" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SinkquantError, match="backend/config.json has changed since it was written"):
        load(folder)


# --- load_prefix_cache -------------------------------------------------------------------------------------------


def prefix_export(folder: Path, ids: list, tensors: dict[str, torch.Tensor] | None = None,
                  record: bool = True) -> Path:
    """A sidecar as `sinkquant export` writes it, for the tiny llama config (2 layers, 2 KV heads, head 16)."""
    config = tiny_config("llama")
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    folder.mkdir()
    if tensors is None:
        tensors = {f"layers.{i}.{p}": torch.randn(1, heads, max(len(ids), 1), dim)
                   for i in range(config.num_hidden_layers) for p in ("keys", "values")}
    save_file(tensors, str(folder / PREFIX_KV))
    (folder / PREFIX_META).write_text(json.dumps({"token_ids": ids}))
    if record:
        (folder / MANIFEST).write_text(json.dumps({"prefix_ids": ids, "sha256": {
            n: sha256_file(folder / n) for n in (PREFIX_KV, PREFIX_META)}}))
    return folder


def test_a_good_prefix_sidecar_loads(tmp_path) -> None:
    ids, cache = load_prefix_cache(prefix_export(tmp_path / "ok", [1, 2]), tiny_config("llama"))
    assert ids == [1, 2] and cache.get_seq_length() == 2


def _kv(change):
    config = tiny_config("llama")
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    tensors = {f"layers.{i}.{p}": torch.randn(1, heads, 2, dim) for i in range(config.num_hidden_layers)
               for p in ("keys", "values")}
    change(tensors)
    return tensors


@pytest.mark.parametrize(("ids", "tensors", "message"), [
    ([10 ** 12, 1], None, "field 'token_ids' holds 1000000000000, outside this model's vocabulary"),
    ([-5, 1], None, "field 'token_ids' holds -5"),
    (["x", 1], None, "field 'token_ids' must be a non-empty list of integer token ids"),
    ([], None, "field 'token_ids' must be a non-empty list"),
    ([True, 1], None, "field 'token_ids' must be a non-empty list of integer"),
    ([1, 2], _kv(lambda t: t["layers.0.keys"].fill_(float("nan"))), "layers.0.keys holds NaN or infinite values"),
    ([1, 2], _kv(lambda t: t.update({"layers.1.values": t["layers.1.values"].to(torch.int8)})),
     "layers.1.values is torch.int8; the prefix KV is floating point"),
    ([1, 2, 3], None, "expected (1, 2, 3, 16)"),
    ([1, 2], _kv(lambda t: t.update({"extra": torch.zeros(1)})), "unexpected tensor 'extra'"),
])
def test_malformed_prefix_sidecars_are_one_line(ids, tensors, message, tmp_path) -> None:
    if ids == [1, 2, 3]:  # three ids, KV of two tokens
        folder = prefix_export(tmp_path / "p", ids, _kv(lambda t: None))
    else:
        folder = prefix_export(tmp_path / "p", ids, tensors)
    with pytest.raises(SinkquantError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prefix_cache(folder, tiny_config("llama"))


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda f: save_file({k: v * 100 for k, v in load_file(str(f / PREFIX_KV)).items()}, str(f / PREFIX_KV)),
     "prefix_kv.safetensors has changed since it was written"),
    (lambda f: (f / MANIFEST).unlink(), "has no sinkquant_export.json"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({"sha256": {}})), "field 'sha256' does not record"),
    (lambda f: (f / PREFIX_META).write_text("{not json"), "prefix.json is not valid JSON"),
    (lambda f: (f / PREFIX_META).write_bytes(b"\xff\xfe"), "prefix.json is not valid UTF-8"),
    (lambda f: (f / PREFIX_META).write_text("[" * 100_000 + "]" * 100_000), "prefix.json nests deeper"),
    (lambda f: (f / PREFIX_KV).write_bytes(b"garbage" * 10), "prefix_kv.safetensors: not a readable safetensors"),
    (lambda f: (f / PREFIX_META).write_text(json.dumps({"token_ids": [2, 1]})), "prefix.json has changed"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({**json.loads((f / MANIFEST).read_text()), "prefix_ids": [2, 1]})),
     "differs from the prefix_ids"),
])
def test_tampered_prefix_sidecars_are_one_line(tamper, message, tmp_path) -> None:
    folder = prefix_export(tmp_path / "p", [1, 2])
    tamper(folder)
    with pytest.raises(SinkquantError, match=message):
        load_prefix_cache(folder, tiny_config("llama"))


@pytest.mark.long
def test_auto_recipe_and_trace_go_inside_the_artifact(smollm2, wikitext_path, tmp_path) -> None:
    """`quantize --recipe auto` writes nothing beside --out: a user's file of the auto recipe's name is kept, and
    the recipe and its trace are files of the artifact (listed, verified, and the recipe the artifact ran)."""
    from sinkquant.cli import main

    model_dir = tiny_folder("llama", smollm2.tokenizer, tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(wikitext_path.read_text()[:40000])
    (tmp_path / "auto-w8a8-static.yaml").write_text("mine")
    out = tmp_path / "out"
    assert main(["quantize", "--quiet", "--recipe", "auto", "--model", str(model_dir), "--data", str(text), "--ctx",
                 "64", "--max-windows", "2", "--bos", "never", "--calib-windows", "3", "--out", str(out)]) == 0
    assert (tmp_path / "auto-w8a8-static.yaml").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto-w8a8-static.yaml", "model", "out", "text.txt"]
    artifact = load(out)
    assert {"auto-w8a8-static.yaml", "auto-w8a8-static.trace.json"} <= set(
        json.loads((out / "sinkquant.json").read_text())["files"])
    assert load_recipe(out / "auto-w8a8-static.yaml").resolved() == artifact.recipe.resolved()
