"""The CLI end to end: readable output, atomic JSON, one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sinkquant.cli import main


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
        (["--ctx", "1"], "ctx=1 is too small"),
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
