"""Wall seconds from the start of a `sinkquant` command to its exit, for every refusal that needs no model: a bad
recipe, a flag that would do nothing, an output folder --overwrite must not replace, a bad data file. Each is
refused before torch is imported (issue 31's goal: under 1 s on an idle machine).

    python eval/bench_refusals.py --repeats 3

Each case runs the installed `sinkquant` console script in a fresh process (interpreter start included), in
order, `--repeats` times; the table gives each case's median and max and the overall max, with the load average
at the start and end (the figures are only as idle as the machine was)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sinkquant.io import OUTPUT_MARKER, atomic_write_json, atomic_write_text, library_versions

REPO = Path(__file__).resolve().parent.parent
SINKQUANT = str(Path(sys.executable).with_name("sinkquant"))
NAIVE = str(REPO / "recipes" / "w8a8-naive.yaml")
GOAL_S = 1.0


def _recipe(folder: Path, name: str, body: dict | str) -> str:
    path = folder / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


def cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(name, arguments, a fragment the one error line must hold)."""
    w8a8 = {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}}

    def recipe(name: str, steps: list, scheme: dict | None = None, **more) -> str:
        return _recipe(tmp, name, {"name": "r", "description": "d", "steps": steps, "scheme": scheme or w8a8, **more})

    os.mkfifo(tmp / "fifo.yaml")
    (tmp / "big.yaml").write_text("# " + "x" * (2 << 20))
    data = {"empty.txt": b"", "three.txt": b"one two three", "binary.raw": b"\x00\xff" * 64,
            "rows.jsonl": b'{"body": "text"}\n', "fake.parquet": b"no parquet here"}
    for name, content in data.items():
        (tmp / name).write_bytes(content)
    mine = tmp / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years")
    home = tmp / "home"
    home.mkdir()
    (home / OUTPUT_MARKER).write_text("")
    artifact = tmp / "artifact"
    artifact.mkdir()
    (artifact / "sinkquant.json").write_text("{}")
    out = str(tmp / "out")
    quantize = ["quantize", "--out", out, "--recipe"]
    return [
        ("recipe missing", [*quantize, str(tmp / "missing.yaml")], "does not exist"),
        ("recipe not YAML", [*quantize, _recipe(tmp, "bad.yaml", "steps: [prefix\n")], "is not valid YAML"),
        ("recipe over 1 MB", [*quantize, str(tmp / "big.yaml")], "limited to"),
        ("recipe is a fifo", [*quantize, str(tmp / "fifo.yaml")], "not a regular file"),
        ("recipe is /dev/zero", [*quantize, "/dev/zero"], "not a regular file"),
        ("unknown step", [*quantize, recipe("unknown.json", [{"cilp": {}}])], "unknown step 'cilp'"),
        ("unknown backend", [*quantize, recipe("backend.json", [], backend="tensorrt")], "unknown backend"),
        ("prefix before rotate", [*quantize, recipe("order.json", [{"prefix": {}}, {"rotate": {}}])],
         "list rotate before prefix"),
        ("smooth before rotate", [*quantize, recipe("order2.json", [{"smooth": {}}, {"rotate": {}}])],
         "list rotate before smooth"),
        ("clip before exceptions", [*quantize, recipe("order3.json", [{"clip": {}}, {"exceptions": {"top": 1}}])],
         "list exceptions before clip"),
        ("keep_sink position 1e21", [*quantize, recipe("pos.json", [{"keep_sink": {"positions": [1e21]}}])],
         "keep_sink.positions.0"),
        ("rotate seed 1e29", [*quantize, recipe("seed.json", [{"rotate": {"seed": 1e29}}])], "rotate.seed"),
        ("gptq block_size 1e12", [*quantize, recipe("gptq.json", [], {"weights": {"bits": 4, "gptq": {
            "block_size": 1e12}}})], "gptq.block_size"),
        ("--scheme with a recipe file", [*quantize, NAIVE, "--scheme", "w4a8kv8"], "--scheme only applies"),
        ("--budget with a recipe file", [*quantize, NAIVE, "--budget", "0.01"], "--budget only applies"),
        ("--max-exceptions with a recipe file", [*quantize, NAIVE, "--max-exceptions", "4"],
         "--max-exceptions only applies"),
        ("compare --budget without auto", ["compare", "--recipes", NAIVE, "--budget", "0.01", "--out", out],
         "--budget only applies"),
        ("auto --calib-windows 1", [*quantize, "auto", "--calib-windows", "1"], "--calib-windows 3 or more"),
        ("auto --scheme w3a3", [*quantize, "auto", "--scheme", "w3a3"], "not a base scheme"),
        ("auto --budget -1", [*quantize, "auto", "--budget", "-1"], "budget=-1.0 is not valid"),
        ("--ctx 1", ["eval", "--ctx", "1"], "is below 2"),
        ("data empty", ["eval", "--data", str(tmp / "empty.txt")], "is empty"),
        ("data of 3 tokens", ["eval", "--data", str(tmp / "three.txt")], "shorter than one window"),
        ("data binary", ["eval", "--data", str(tmp / "binary.raw")], "not valid UTF-8"),
        ("data wrong field", ["eval", "--data", str(tmp / "rows.jsonl")], "has no field 'text'"),
        ("data fake parquet", ["eval", "--data", str(tmp / "fake.parquet")], "not a parquet file"),
        ("quantize data too short", [*quantize, NAIVE, "--data", str(tmp / "three.txt")], "shorter than one"),
        ("--out a user's folder", ["convert", "--out", str(mine), "--overwrite"], "was not written by sinkquant"),
        ("--out the home folder", ["convert", "--out", str(home), "--overwrite"], "home folder"),
        ("--out /etc", ["convert", "--out", "/etc", "--overwrite"], "is a system folder"),
        ("export onto its artifact", ["export", str(artifact), "--out", str(artifact), "--overwrite"],
         "which this command reads"),
        ("export of a non-artifact", ["export", str(tmp), "--out", out], "not a sinkquant artifact"),
        ("export --format bogus", ["export", str(artifact), "--format", "bogus", "--out", out],
         "--format 'bogus' is not valid"),
        ("eval --out a folder", ["eval", "--out", str(tmp)], "is a folder; pass a file path"),
    ]


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(args: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + system: what the command costs, whatever else the machine runs), exit
    status and stderr of one run."""
    cpu, start = _child_cpu(), time.perf_counter()
    proc = subprocess.run([SINKQUANT, *args], capture_output=True, text=True, env=env, timeout=300)
    return time.perf_counter() - start, _child_cpu() - cpu, proc.returncode, proc.stderr.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "refusals")
    args = p.parse_args()
    load_before = os.getloadavg()
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="sinkquant-refusals-") as folder:
        tmp = Path(folder)
        env = {**os.environ, "HOME": str(tmp / "home")}
        table = cases(tmp)
        times: dict[str, list[float]] = {name: [] for name, _, _ in table}
        cpus: dict[str, list[float]] = {name: [] for name, _, _ in table}
        for _ in range(args.repeats):  # interleaved: a load spike hits every case alike
            for name, argv, fragment in table:
                seconds, cpu, code, err = run_case(argv, env)
                times[name].append(seconds)
                cpus[name].append(cpu)
                lines = err.splitlines()
                if code != 2 or len(lines) != 1 or fragment not in err or "Traceback" in err:
                    failures.append(f"{name}: exit {code}: {err[-300:]}")
        for name, argv, _ in table:
            rows.append({"case": name, "command": "sinkquant " + shlex.join(argv).replace(folder, "$TMP"),
                         "median_s": statistics.median(times[name]), "max_s": max(times[name]),
                         "cpu_median_s": statistics.median(cpus[name]), "cpu_max_s": max(cpus[name])})
    load_after = os.getloadavg()
    worst = max(r["max_s"] for r in rows)
    worst_cpu = max(r["cpu_max_s"] for r in rows)
    command = "python eval/bench_refusals.py " + shlex.join(sys.argv[1:])
    result = {
        "command": command, "goal_s": GOAL_S, "max_s": worst, "cpu_max_s": worst_cpu, "cases": rows,
        "failures": failures, "repeats": args.repeats, "load_average_start": load_before,
        "load_average_end": load_after, "cpus": os.cpu_count(), "machine": platform.platform(),
        "versions": library_versions(),
    }
    lines = [
        "# Parse-time refusals: wall seconds from process start to exit", "",
        f"`{command}` ({args.repeats} runs of each case, interleaved; `sinkquant` console script, fresh process "
        f"each). {len(rows)} cases refused before torch is imported; every "
        "one a single error line with exit status 2"
        + (f"; {len(failures)} did not refuse as expected" if failures else "") + ".", "",
        f"Worst case: **{worst:.2f} s** wall, **{worst_cpu:.2f} s** CPU (user + system of the command; goal: "
        f"under {GOAL_S:g} s wall on an idle machine, where wall is about CPU). Load average "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end, {os.cpu_count()} CPUs: "
        + ("the machine was shared while this ran, so these are upper bounds." if max(load_before[0], load_after[0])
           > 0.5 else "the machine was idle."), "",
        "| case | wall median s | wall max s | CPU median s | CPU max s |", "|---|---:|---:|---:|---:|",
        *(f"| {r['case']} | {r['median_s']:.2f} | {r['max_s']:.2f} | {r['cpu_median_s']:.2f} | "
          f"{r['cpu_max_s']:.2f} |" for r in rows), "",
        "Commands ($TMP is the benchmark's temporary folder, HOME points into it):", "",
        *(f"- {r['case']}: `{r['command']}`" for r in rows), "",
    ]
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines[:6]))
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
