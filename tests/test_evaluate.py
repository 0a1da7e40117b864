"""Perplexity and task scoring against closed forms, with a bigram model whose
distribution is known exactly."""
import math

import pytest
import torch

from rsparse import evaluate
from rsparse.errors import RSparseError


class Out(dict):
    __getattr__ = dict.__getitem__


class Bigram(torch.nn.Module):
    """logits[t] = log P[ids[t]]: next-token distribution depends on the current token only."""

    def __init__(self, P):
        super().__init__()
        self.logP = P.log()

    def forward(self, ids, use_cache=False, cache=None):
        return Out(logits=self.logP[ids], cache=None)


class CharTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 97 for c in text]}

    bos_token_id = 0
    eos_token_id = 0


def test_perplexity_closed_form():
    torch.manual_seed(0)
    V = 6
    P = torch.softmax(torch.randn(V, V), -1)
    model = Bigram(P)
    w = torch.randint(0, V, (3, 50))
    nll = -sum(math.log(P[a, b]) for row in w.tolist() for a, b in zip(row[:-1], row[1:])) / (3 * 49)
    for protocol in ("all",):
        r = evaluate.perplexity(model, w, protocol=protocol, progress=False)
        assert r["tokens"] == 3 * 49 and r["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    uniform = evaluate.perplexity(Bigram(torch.full((V, V), 1 / V)), w, progress=False)
    assert uniform["ppl"] == pytest.approx(V, rel=1e-6)


def test_task_scoring_picks_by_total_and_by_length():
    V = 26
    P = torch.full((V, V), 0.2 / (V - 2))
    a, b, c = 0, 1, 2
    P[a, b] = 0.5  # a -> b likely
    P[a, c] = 0.3
    P[c, c] = 0.99  # c -> c almost certain
    P[c] /= P[c].sum()
    P[a] /= P[a].sum()
    model = Bigram(P)
    # choice 0: "b" (one likely token); choice 1: "cccc" (a less likely start, then near-certain)
    doc = {"doc_id": 0, "label": 1, "choices": [("a", "b"), ("a", "cccc")]}
    lp_b = math.log(P[a, b])
    lp_c = math.log(P[a, c]) + 3 * math.log(P[c, c])
    assert lp_b > lp_c and lp_c / 4 > lp_b / 1  # acc picks 0, acc_norm picks 1
    r = evaluate.score_docs(model, CharTok(), [doc], protocol="all", progress=False)
    assert r == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    doc["label"] = 0
    r = evaluate.score_docs(model, CharTok(), [doc], protocol="all", progress=False)
    assert r["acc"] == 1.0 and r["acc_norm"] == 0.0


def test_task_files_load():
    docs = evaluate.load_task("arc_easy", limit=5)
    assert len(docs) == 5 and all(0 <= d["label"] < len(d["choices"]) for d in docs)
    assert len(evaluate.load_task("winogrande")) == 1267
    with pytest.raises(RSparseError, match="unknown task"):
        evaluate.load_task("mmlu_pro")
    with pytest.raises(RSparseError, match="protocol"):
        evaluate.perplexity(None, torch.zeros(1, 4, dtype=torch.long), protocol="half")


def test_decode_protocol_equals_all_for_dense_model(smol):
    model, tok = smol()
    docs = evaluate.load_task("piqa", limit=3)
    a = evaluate.score_docs(model, tok, docs, protocol="all", progress=False)
    d = evaluate.score_docs(model, tok, docs, protocol="decode", progress=False)
    assert a == d
