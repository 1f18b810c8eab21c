"""Peak memory of a profile of a 0.5B model at ctx 2048, against a plain forward of the same window.

    python eval/bench_profile_memory.py --ctx 2048 --windows 2

No 0.5B checkpoint is reachable offline, so the model is Qwen2-0.5B's architecture (24 layers, hidden 896,
14 query / 2 KV heads, MLP 4864, vocab 151936) with random weights: memory depends on the shapes, not the
values. SmolLM2's tokenizer supplies the ids. Goal: the profile fits in 24 GB (streaming statistics; no
attention map of more than one layer of one window is kept)."""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path

import benchlib
from transformers import AutoTokenizer, Qwen2Config

from sinkquant.data import load_text, plan_windows, tokenize
from sinkquant.models import random_model
from sinkquant.profiling.profiler import profile
from sinkquant.tables import markdown_table
from sinkquant.zoo import DEFAULT_MODEL, ZOO

GB = 1024**3
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "rope_theta": 1000000.0, "bos_token_id": 1, "eos_token_id": 2}


def peak_rss() -> float:
    """Peak resident set of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


def main() -> None:
    parser = benchlib.parser(__doc__, windows=2, out="eval/results/profile_memory")
    parser.set_defaults(ctx=2048)
    args = parser.parse_args()
    benchlib.configure(args)
    gguf = ZOO[DEFAULT_MODEL].path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    stream = tokenize(load_text(args.data), tokenizer)
    start = peak_rss()
    loaded = random_model(Qwen2Config(**QWEN2_05B), tokenizer, spec="qwen2-0.5b-random")
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    after_model = peak_rss()
    plan = plan_windows(stream, args.ctx, calib_windows=args.windows)
    benchlib.timed_forward(model, stream.windows(args.ctx, list(plan.calib_windows)))
    after_forward = peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        report = profile(loaded, stream, ctx=args.ctx, windows=args.windows, bos="never",
                         out=Path(tmp) / "report", progress=True)
    after_profile = peak_rss()
    passed = after_profile < 24 * GB
    rows = [
        ["before the model (tokenizer, text)", f"{start / GB:.2f}", "-"],
        [f"model built ({params / 1e6:.0f}M params, fp32)", f"{after_model / GB:.2f}",
         f"{(after_model - start) / GB:.2f}"],
        [f"plain forward, {args.windows} windows of {args.ctx}", f"{after_forward / GB:.2f}",
         f"{(after_forward - after_model) / GB:.2f}"],
        ["profile (hooks, attention probe, report)", f"{after_profile / GB:.2f}",
         f"{(after_profile - after_forward) / GB:.2f}"],
    ]
    body = (f"Random-weight Qwen2-0.5B architecture, ctx {args.ctx}, {args.windows} calibration windows, "
            f"profile {report['run']['seconds']:.0f} s. Goal: peak under 24 GB.\n\n"
            + markdown_table(["stage", "peak RSS so far (GiB)", "added (GiB)"], rows)
            + f"\n\nCheck: peak {after_profile / GB:.2f} GiB {'<' if passed else '>='} 24 GiB: "
            + ("PASS" if passed else "FAIL"))
    benchlib.write_result(args.out, "Profile memory, 0.5B model", body, {
        "params": params, "ctx": args.ctx, "windows": args.windows, "peak_rss_bytes": {
            "start": start, "model": after_model, "forward": after_forward, "profile": after_profile},
        "profile_seconds": report["run"]["seconds"], "pass": passed})


if __name__ == "__main__":
    main()
