"""lm-evaluation-harness's `sinkquant` model type: lm-eval's loglikelihoods and perplexity on an artifact equal
sinkquant's evaluator's on the same tokens (prefix KV and kept positions included), offline, on local tasks in
lm-eval's own format."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from sinkquant.cli import main
from sinkquant.data import TokenStream, load_text, plan_windows
from sinkquant.engine import apply_recipe, load, save
from sinkquant.errors import SinkquantError
from sinkquant.harness import NAME, SinkquantLM
from sinkquant.perplexity import evaluate
from sinkquant.recipe import parse_recipe
from tests.tiny import tiny_model

CTX = 64
MC_DATA = Path(__file__).parent / "data" / "lm_eval" / "sinkquant_mc.jsonl"
STATIC = {"weights": {"bits": 8, "granularity": "channel"},
          "activations": {"bits": 8, "mode": "static", "observer": "absmax"}}
RECIPES = {
    # a BOS prefix whose fp KV is cached, and kept positions / token ids inside every request
    "prefix-keep": {"name": "prefix-keep", "description": "test", "scheme": STATIC, "calibration": {"windows": 2},
                    "steps": [{"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}},
                              {"keep_sink": {"positions": [3], "token_ids": [13]}}]},
    # real int8 kernels and the native backend's int8 KV cache, no prefix
    "native-kv": {"name": "native-kv", "description": "test", "backend": "native", "calibration": {"windows": 2},
                  "scheme": {**STATIC, "kv": {"bits": 8, "granularity": "token"}},
                  "steps": [{"keep_sink": {"positions": [0]}}]},
}


@pytest.fixture(scope="module")
def text(smollm2, wikitext_path) -> tuple[str, list[int]]:
    """A WikiText piece cut at a token boundary into 3 whole windows of CTX tokens."""
    raw = load_text(str(wikitext_path)).text[:4000]
    encoded = smollm2.tokenizer(raw, add_special_tokens=False, return_offsets_mapping=True)
    piece = raw[: encoded.offset_mapping[3 * CTX][0]]
    ids = smollm2.tokenizer(piece, add_special_tokens=False).input_ids
    assert len(ids) == 3 * CTX
    return piece, ids


@pytest.fixture(scope="module")
def artifacts(smollm2, tmp_path_factory) -> dict[str, Path]:
    stream = TokenStream(ids=torch.randint(3, 5000, (CTX * 6,), generator=torch.Generator().manual_seed(0)),
                         text_sha256="random", source={})
    folder = tmp_path_factory.mktemp("artifacts")
    return {name: save(apply_recipe(tiny_model("llama", smollm2.tokenizer), parse_recipe(recipe), stream, ctx=CTX),
                       folder / name) for name, recipe in RECIPES.items()}


@pytest.fixture(params=sorted(RECIPES))
def artifact(request, artifacts) -> Path:
    return artifacts[request.param]


def _stream(ids: list[int]) -> TokenStream:
    return TokenStream(ids=torch.tensor(ids), text_sha256="test", source={})


def _task(folder: Path, name: str, body: dict) -> TaskManager:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **body}))
    return TaskManager(include_path=str(folder), include_defaults=False)  # indexing lm-eval's own tasks takes ~20 s


def test_registered_with_lm_eval() -> None:
    assert get_model(NAME) is SinkquantLM


def test_window_loglikelihoods_equal_the_evaluators(artifact: Path, text) -> None:
    """Each evaluator window as an lm-eval request (token 0 the context, the rest the continuation)."""
    _, ids = text
    lm = SinkquantLM(artifact=str(artifact), ctx=CTX)
    stream = _stream(ids)
    plan = plan_windows(stream, CTX)
    requests = [(("", ""), w[:1], w[1:]) for w in (ids[i * CTX : (i + 1) * CTX] for i in plan.eval_windows)]
    nll = -sum(ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True))
    expected = load(artifact).evaluate(stream, plan, progress=False)
    assert nll == pytest.approx(expected.nll_sum, rel=1e-6)


def test_rolling_task_gives_sinkquant_perplexity(artifact: Path, text, tmp_path: Path) -> None:
    """lm-eval's perplexity-style task (loglikelihood_rolling, as its wikitext task) over a local text."""
    piece, ids = text
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": piece}) + "\n")
    tasks = _task(tmp_path, "sinkquant_text", {
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                         "higher_is_better": False}]})
    results = simple_evaluate(model=NAME, model_args={"artifact": str(artifact), "ctx": CTX}, tasks=["sinkquant_text"],
                              task_manager=tasks, log_samples=True)
    loglikelihood = results["samples"]["sinkquant_text"][0]["filtered_resps"][0]
    stream = _stream(ids)
    expected = load(artifact).evaluate(stream, plan_windows(stream, CTX), progress=False)
    assert math.exp(-loglikelihood / expected.tokens) == pytest.approx(expected.ppl, rel=1e-6)
    word_ppl = results["results"]["sinkquant_text"]["word_perplexity,none"]
    assert word_ppl == pytest.approx(math.exp(-loglikelihood / len(re.split(r"\s+", piece))), rel=1e-6)


def test_multiple_choice_task_scores_each_choice_as_the_evaluator(artifact: Path, tmp_path: Path) -> None:
    """A local multiple-choice set through lm-eval: every choice's loglikelihood is the evaluator's NLL of
    context + choice minus its NLL of the context alone (one window each, the same conditioning in front)."""
    tasks = _task(tmp_path, "sinkquant_mc", {
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(MC_DATA)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]})
    results = simple_evaluate(model=NAME, model_args={"artifact": str(artifact)}, tasks=["sinkquant_mc"],
                              task_manager=tasks, log_samples=True)
    samples = results["samples"]["sinkquant_mc"]
    assert len(samples) == len(MC_DATA.read_text().splitlines())
    assert 0.0 <= results["results"]["sinkquant_mc"]["acc,none"] <= 1.0
    quantized = load(artifact)
    tokenizer = quantized.base.tokenizer
    for sample in samples[:2]:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            nll = {}
            for key, ids in (("context", context_ids), ("whole", whole)):
                stream = _stream(ids)
                nll[key] = quantized.evaluate(stream, plan_windows(stream, len(ids)), progress=False).nll_sum
            assert -loglikelihood == pytest.approx(nll["whole"] - nll["context"], rel=1e-5, abs=1e-4)


def test_generate_until_is_the_artifacts_generation(artifact: Path) -> None:
    lm = SinkquantLM(artifact=str(artifact))
    prompts = ["The capital of France is", "Once upon a time"]
    requests = [Instance(request_type="generate_until", doc={}, arguments=(p, {"until": ["\n"], "max_gen_toks": 8}),
                         idx=0) for p in prompts]
    quantized = load(artifact)
    assert lm.generate_until(requests, disable_tqdm=True) == \
        [quantized.generate(p, max_new_tokens=8).split("\n")[0] for p in prompts]


def test_fp_baseline_under_the_same_conventions(smollm2, text, tmp_path: Path) -> None:
    """`model=SPEC`: the fp model with the BOS policy, scored like `sinkquant eval` scores it."""
    _, ids = text
    loaded = tiny_model("llama", smollm2.tokenizer)
    loaded.model.save_pretrained(tmp_path / "fp")
    smollm2.tokenizer.save_pretrained(tmp_path / "fp")
    lm = SinkquantLM(model=str(tmp_path / "fp"), ctx=CTX, bos="per-window")
    assert lm.context == [smollm2.tokenizer.bos_token_id]
    stream = _stream(ids)
    expected = evaluate(loaded, stream, plan_windows(stream, CTX), bos="per-window", progress=False)
    rolling = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={},
                                                 arguments=(smollm2.tokenizer.decode(ids),), idx=0)],
                                       disable_tqdm=True)
    assert -rolling[0] == pytest.approx(expected.nll_sum, rel=1e-6)


@pytest.mark.long
def test_cli_runs_lm_eval_with_the_model_type(artifacts, tmp_path: Path, capsys) -> None:
    """`sinkquant lm-eval` is lm-eval's own command line with the model type registered; its errors are one line."""
    _task(tmp_path, "sinkquant_mc_cli", {
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(MC_DATA)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]})
    out = tmp_path / "results"
    assert main(["lm-eval", "--model_args", f"artifact={artifacts['prefix-keep']}", "--tasks", "sinkquant_mc_cli",
                 "--include_path", str(tmp_path), "--output_path", str(out)]) == 0
    written = list(out.rglob("results*.json"))
    assert written and "sinkquant_mc_cli" in json.loads(written[0].read_text())["results"]
    assert "sinkquant_mc_cli" in capsys.readouterr().out
    assert main(["lm-eval", "--model_args", "artifact=/nonexistent/folder", "--tasks", "sinkquant_mc_cli",
                 "--include_path", str(tmp_path)]) == 2
    assert "sinkquant lm-eval: error: " in capsys.readouterr().err


def test_bad_model_args_are_one_line_errors(artifacts) -> None:
    with pytest.raises(SinkquantError, match="exactly one"):
        SinkquantLM()
    with pytest.raises(SinkquantError, match="one request per forward"):
        SinkquantLM(artifact=str(artifacts["prefix-keep"]), batch_size=8)
    with pytest.raises(SinkquantError, match="load on the CPU"):
        SinkquantLM(artifact=str(artifacts["prefix-keep"]), device="cuda")
