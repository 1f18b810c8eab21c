"""lm-evaluation-harness model type `sinkquant`: a sinkquant artifact (or an fp model, the baseline) scored on
lm-eval's tasks exactly as sinkquant's own evaluator scores it, with its prefix KV and kept positions.

lm-eval's `hf` model would run an artifact's weights without the prefix the recipe calibrated behind, and has no
way to load the integer layers. Here every forward goes through `sinkquant.perplexity.logits_after_context`, the
function the perplexity evaluator runs: the prefix stands in front of every request through its fp KV cache (or
BOS as tokens, per the BOS policy, when there is no prefix), the recipe's kept positions hold through the model's
own hooks, and the backend's KV cache (the native int8 one) is the one evaluation uses.

Importing this module registers the model type; lm-eval 0.4 has no plugin discovery, so `sinkquant lm-eval ...`
imports it and then runs lm-eval's own command line, and Python callers import it before `simple_evaluate`.

- loglikelihood: the context and continuation tokenized as lm-eval's causal models do (`TemplateLM`); one
  request per forward over context + continuation, as the evaluator runs one window per forward.
- loglikelihood_rolling: sinkquant's perplexity protocol on the document: disjoint windows of `ctx` tokens,
  token 0 of each window conditions only, the rest are scored (the last, shorter window too). On a text of whole
  windows the sum is `sinkquant eval`'s NLL, so lm-eval's perplexity task gives sinkquant's perplexity; its word
  and byte perplexities divide by the whole document, so they sit slightly below what `--model hf` (which
  scores every token) reports: compare them across sinkquant model types, not with other model types.
- generate_until: greedy generation behind the prefix (its KV reused), stopped at `until` or `max_gen_toks`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm
from transformers import Cache

from sinkquant.errors import SinkquantError
from sinkquant.models import load_model, model_device
from sinkquant.perplexity import logits_after_context, resolve_bos

NAME = "sinkquant"
DEFAULT_CTX = 512  # sinkquant eval's --ctx
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's


@register_model(NAME)
class SinkquantLM(TemplateLM):
    """`--model sinkquant --model_args artifact=DIR` (a `sinkquant quantize` folder) or `model=SPEC` (the fp model
    under the same conventions, for the baseline). Other model_args: `ctx` (windows of loglikelihood_rolling),
    `bos` (never / per-window / auto, for an fp model or an artifact without a prefix), `verify` (the artifact's
    sha256 check), `max_gen_toks`, `trust_remote_code`. lm-eval also passes its --batch_size, --max_batch_size and
    --device: requests run one per forward on the CPU, so only 1 and cpu are accepted."""

    def __init__(self, artifact: str | None = None, model: str | None = None, ctx: int = DEFAULT_CTX,
                 bos: str = "auto", verify: bool = True, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 trust_remote_code: bool = False, batch_size: int | str | None = None, device: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if (artifact is None) == (model is None):
            raise SinkquantError("--model_args: give artifact=DIR (a `sinkquant quantize` folder) or model=SPEC "
                                 "(the fp baseline), exactly one")
        if str(batch_size if batch_size is not None else 1) != "1":
            raise SinkquantError(f"--batch_size {batch_size}: the sinkquant model type runs one request per forward, "
                                 "as sinkquant's evaluator does (identical numerics); leave it at 1")
        if device not in (None, "cpu"):
            raise SinkquantError(f"--device {device}: sinkquant artifacts load on the CPU; use --device cpu")
        if not isinstance(ctx, int) or ctx < 2:
            raise SinkquantError(f"ctx={ctx!r}: a window needs at least 2 tokens (an integer >= 2)")
        if artifact is not None:
            from sinkquant.engine import load

            quantized = load(str(artifact), verify=bool(verify))
            self.loaded, self.model, prefix = quantized.base, quantized.model, quantized.prefix
            self.context = prefix.ids if prefix is not None else self._bos_context(bos)
            self.cached = prefix is not None and prefix.cache is not None
            self.make_cache: Callable[[int], Cache | None] | None = quantized.cache_for_batch
        else:
            self.loaded = load_model(str(model), trust_remote_code=bool(trust_remote_code))
            self.model = self.loaded.model
            self.context, self.cached, self.make_cache = self._bos_context(bos), False, None
        self.model.eval()
        self.tokenizer = self.loaded.tokenizer
        self.ctx = ctx
        self.max_gen_toks = int(max_gen_toks)

    def _bos_context(self, bos: str) -> list[int]:
        return [self.loaded.bos_id] if resolve_bos(bos, self.loaded) else []

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on (as lm-eval's hf model): BOS where the tokenizer has one."""
        return self.loaded.bos_id if self.loaded.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Tokens a request may hold after the context in front of it."""
        limit = self.loaded.max_context or 2048
        return limit - len(self.context)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """No special tokens, as sinkquant tokenizes a text: BOS or the prefix comes from the context in front."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def token_scores(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(ids[t] | context, ids[:t]), whether ids[t] is the argmax) for t = 1..len(ids)-1, from one
        forward over `ids` behind the context."""
        tensor = torch.tensor([ids], device=model_device(self.model))
        logits = logits_after_context(self.model, tensor, self.context, self.cached, self.make_cache)
        log_probs = logits[0, :-1].float().log_softmax(-1)
        target = tensor[0, 1:]
        return log_probs.gather(-1, target[:, None])[:, 0], log_probs.argmax(-1) == target

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = []
        for key, context_enc, continuation_enc in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            if not continuation_enc:
                raise SinkquantError(f"lm-eval request {key!r} has an empty continuation: nothing to score")
            n = len(continuation_enc)
            log_probs, greedy = self.token_scores((context_enc + continuation_enc)[-self.max_length:])
            result = (float(log_probs[-n:].sum()), bool(greedy[-n:].all()))
            self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each document by sinkquant's perplexity protocol (module docstring): windows of `ctx` tokens, token 0
        of each conditioning only."""
        results = []
        for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tok_encode(text)
            windows = [ids[i : i + self.ctx] for i in range(0, len(ids), self.ctx)]
            result = sum(float(self.token_scores(w)[0].sum()) for w in windows if len(w) > 1)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
            results.append(result)
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results = []
        device = model_device(self.model)
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            options = dict(gen_kwargs)
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id])
            if eot not in until:
                until.append(eot)
            max_new = int(options.pop("max_gen_toks", self.max_gen_toks))
            if not options.get("do_sample"):
                options = {"do_sample": False}
            ids = torch.tensor([self.context + self.tok_encode(context)], device=device)
            past = self.make_cache(1) if self.make_cache is not None else None  # generate skips its cached part
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      past_key_values=past, stop_strings=until, tokenizer=self.tokenizer,
                                      pad_token_id=self.tokenizer.pad_token_id or self.eot_token_id, **options)
            text = self.tok_decode(out[0, ids.shape[1]:].tolist())
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results

