"""The CLI end to end: readable output, atomic JSON, one-line errors with a non-zero exit, refused numbers at
parse time, a fast and quiet --help, Ctrl-C, and flags that are honoured (device, dtype, calibration windows,
a prefix recipe overriding --bos)."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sinkquant.cli import main

CLI = Path(__file__).resolve().parent.parent / "sinkquant" / "cli"
HEAVY = ("torch", "transformers", "torchao", "datasets", "matplotlib")


def test_eval_writes_json(tmp_path: Path, wikitext_path: Path) -> None:
    out = tmp_path / "res" / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sinkquant.cli", "eval", "--data", str(wikitext_path), "--ctx", "64",
         "--max-windows", "2", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "wrote" in proc.stdout
    result = json.loads(out.read_text())
    assert result["windows"] == 2 and result["ctx"] == 64 and result["tokens"] == 126
    assert result["data"]["sha256"] == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    assert result["model"]["kind"] == "embedded" and len(result["model"]["sha256"]) == 64
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/does/not/exist"], "neither a folder with config.json"),
        (["--model", "missing.gguf"], "model file missing.gguf does not exist"),
        (["--data", "missing.txt"], "data file missing.txt does not exist"),
        (["--ctx", "9000", "--bos", "never"], "exceeds the model's limit of 8192 positions"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path, capsys, wikitext_path) -> None:
    out = tmp_path / "eval.json"
    data = [] if "--data" in args else ["--data", str(wikitext_path)]
    code = main(["eval", "--quiet", "--max-windows", "1", *data, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["quantize", "compare"])
@pytest.mark.parametrize(("args", "message"), [
    (["--scheme", "w4a9"], "scheme='w4a9' is not a base scheme for --recipe auto; valid: w8a8-static"),
    (["--budget", "-1"], "budget=-1.0 is not valid; valid: a positive number"),
    (["--max-exceptions", "-3"], "max_exceptions=-3 is not valid; valid: a whole number >= 0"),
])
def test_bad_auto_settings_fail_before_the_model_loads(command, args, message, tmp_path, capsys) -> None:
    # the model does not exist: an error about --scheme/--budget, not the model, shows they are checked first
    recipe = ["--recipe", "auto"] if command == "quantize" else ["--recipes", "auto"]
    out = tmp_path / "out"
    code = main([command, "--quiet", *recipe, *args, "--model", "missing.gguf", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not out.exists()


def test_text_shorter_than_a_window(tmp_path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    code = main(["eval", "--quiet", "--data", str(short), "--ctx", "512"])
    assert code == 2
    assert "shorter than one window of ctx=512" in capsys.readouterr().err


def test_folder_without_config(tmp_path, capsys) -> None:
    code = main(["eval", "--quiet", "--model", str(tmp_path)])
    assert code == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--batch-size", "0"], "sinkquant eval: error: argument --batch-size: 0 is below 1"),
        (["eval", "--ctx", "0"], "sinkquant eval: error: argument --ctx: 0 is below 2"),
        (["profile", "--ctx", "1", "--out", "x"], "sinkquant profile: error: argument --ctx: 1 is below 2"),
        (["eval", "--max-windows", "-1"], "sinkquant eval: error: argument --max-windows: -1 is below 0"),
        (["quantize", "--recipe", "r.yaml", "--out", "x", "--max-windows", "-1"], "--max-windows: -1 is below 0"),
        (["profile", "--calib-windows", "0", "--out", "x"], "argument --calib-windows: 0 is below 1"),
        (["quantize", "--recipe", "r.yaml", "--out", "x", "--calib-windows", "0"], "--calib-windows: 0 is below 1"),
        (["eval", "--ctx", "12x"], "argument --ctx: '12x' is not an integer"),
        (["eval", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(args, message, capsys) -> None:
    start = time.perf_counter()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert time.perf_counter() - start < 1.0  # parse time: no model, no text


def _top_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:  # module level only; TYPE_CHECKING blocks are `if` nodes
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("module", sorted(CLI.glob("*.py")), ids=lambda p: p.stem)
def test_cli_modules_import_no_heavy_library_at_module_level(module: Path) -> None:
    heavy = [n for n in _top_level_imports(module) if n.split(".")[0] in HEAVY
             or (n.startswith("sinkquant.") and not n.startswith(("sinkquant.cli", "sinkquant.errors")))]
    assert heavy == [], f"{module.name} imports {heavy} at module level; import them inside the command"


def _eager_package() -> bool:
    """True while sinkquant/__init__.py imports the whole API (torch included) eagerly; then no CLI can start
    fast or catch Ctrl-C during imports, whatever sinkquant.cli does."""
    probe = "import sys, sinkquant; print(int('torch' in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "1"


@pytest.fixture(scope="module")
def lazy_package() -> None:
    if _eager_package():
        pytest.skip("sinkquant/__init__.py imports torch eagerly; needs its lazy (PEP 562) form")


def test_help_prints_only_help_and_imports_nothing_heavy(lazy_package) -> None:
    probe = ("import sys; from sinkquant.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: sinkquant") and proc.stdout.strip().endswith("HEAVY []")


def test_ctrl_c_while_importing_is_one_line(lazy_package, tmp_path: Path) -> None:
    # SIGINT at its default in the child, as for a command typed in a terminal: a test run started in the
    # background of a non-interactive shell ignores SIGINT, every child inherits that, and the command then
    # never sees the interrupt (it ran to the end and exited 0).
    proc = subprocess.Popen([sys.executable, "-m", "sinkquant.cli", "eval", "--quiet", "--out", str(tmp_path / "e")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    # Interrupt once torch's library is mapped (main's handler is in place by then); a fixed sleep is flaky
    # on a loaded machine, where 1 s may not reach main at all.
    while time.monotonic() < deadline and proc.poll() is None:
        if "libtorch" in maps.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == "sinkquant: interrupted; nothing partial was written"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    assert main(["eval", "--quiet", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sinkquant eval: error: --device cuda: torch sees no CUDA device here; use --device cpu or auto"


def test_convert_honours_dtype(tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert main(["convert", "--quiet", "--dtype", "bfloat16", "--out", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as handle:
        name = next(iter(handle.keys()))
        assert str(handle.get_tensor(name).dtype) == "torch.bfloat16"


def _prefix_recipe(folder: Path) -> Path:
    """The cheapest prefix recipe: BOS alone as the prefix, dynamic per-token int8 (no calibration statistics)."""
    recipe = folder / "prefix.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bos-prefix-dynamic", "description": "test: a BOS-only prefix, dynamic per-token int8",
        "steps": [{"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}}],
        "scheme": {"weights": {"bits": 8, "granularity": "channel"},
                   "activations": {"bits": 8, "mode": "dynamic-token"}},
        "calibration": {"windows": 8}}))
    return recipe


def test_quantize_honours_calib_windows_and_says_the_prefix_overrides_bos(tmp_path, capsys, wikitext_path) -> None:
    recipe = _prefix_recipe(tmp_path)
    out = tmp_path / "artifact"
    code = main(["quantize", "--quiet", "--recipe", str(recipe), "--data", str(wikitext_path), "--ctx", "32",
                 "--max-windows", "1", "--calib-windows", "2", "--bos", "per-window", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "sinkquant quantize: note: recipe bos-prefix-dynamic puts its prefix" in err
    assert "--bos per-window is overridden" in err
    manifest = json.loads((out / "sinkquant.json").read_text())
    assert manifest["recipe"]["calibration"]["windows"] == 2
    assert manifest["overrides"][0]["flag"] == "--bos" and manifest["overrides"][0]["given"] == "per-window"
    assert manifest["run"] == {"device": "cpu", "dtype": "float32", "calib_windows": 2}


def test_compare_says_and_records_the_prefix_overriding_bos(tmp_path, capsys, wikitext_path) -> None:
    out = tmp_path / "compare"
    code = main(["compare", "--quiet", "--recipes", str(_prefix_recipe(tmp_path)), "--data", str(wikitext_path),
                 "--ctx", "32", "--max-windows", "1", "--bos", "auto", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "sinkquant compare: note: recipe bos-prefix-dynamic puts its prefix" in err and "--bos auto" in err
    result = json.loads((out / "compare.json").read_text())
    assert [o["recipe"] for o in result["overrides"]] == ["bos-prefix-dynamic"]
    assert result["run"] == {"device": "cpu", "dtype": "float32"}


@pytest.mark.slow
@pytest.mark.long
def test_compare_calib_windows_overrides_every_recipe_like_quantize(tmp_path, wikitext_path, smollm2,
                                                                    wikitext_stream) -> None:
    """One meaning per flag: `compare --calib-windows 2` calibrates each recipe on 2 windows, as `quantize` does."""
    from sinkquant.data import plan_windows
    from sinkquant.engine import apply_recipe
    from sinkquant.recipe import load_recipe

    assert main(["compare", "--quiet", "--data", str(wikitext_path), "--ctx", "32", "--max-windows", "1",
                 "--recipes", "recipes/w8a8-naive.yaml", "--calib-windows", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["settings"]["calib_windows"] == 2
    compared = next(r["ppl"] for r in result["rows"] if r["recipe"] == "w8a8-naive")
    recipe = load_recipe("recipes/w8a8-naive.yaml")
    plan = plan_windows(wikitext_stream, 32, 1, calib_windows=2)
    quantized = {windows: apply_recipe(smollm2, recipe.with_calib_windows(windows), wikitext_stream, ctx=32,
                                       copy=True).evaluate(wikitext_stream, plan, progress=False).ppl
                 for windows in (2, None)}
    assert recipe.calibration.windows == 8
    assert compared == quantized[2] != quantized[None]  # the recipe's own 8 windows give another model
