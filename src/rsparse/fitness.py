"""Fitness of an allocation: how far the sparse model's next-token distributions are from the
dense model's, on calibration windows disjoint from the threshold-calibration windows and from
the evaluation text.

    KL = mean over tokens t of  sum_v p_dense(v | <t) * (log p_dense(v | <t) - log p_sparse(v | <t))

Both are computed from the same logits; `SearchConfig.fitness` picks the one the search minimises.
KL to the dense model is the default: it is zero for the dense model and compares whole
distributions (not one sampled target token per position); cross-entropy on the true next tokens
(log perplexity, the paper's fitness) is the alternative. benchmarks/fitness_rank.py measures how
each ranks plans against perplexity on evaluation text (alike); benchmarks/fitness_cost.py how many
calibration tokens each needs to tell a plan from its mutant (CE 7.6x KL's at 50%, 1.24x at 70%).

Cost control: the inputs of block 0 are captured once, and the hidden states entering block
`start` under the incumbent plan are cached (`advance`), so a candidate that differs only from
block `start` on is run from there: a group-wise search over the last blocks costs a fraction
of a forward pass. The dense log-probabilities are computed once (float32, kept in memory:
tokens x vocabulary x 4 bytes, about 200 MB per 1024 tokens for a 49k vocabulary).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .apply import swapped
from .calibrate import block_inputs, layer_out
from .families import blocks, final_logits, scalars, text_model


class Fitness:
    """KL / cross-entropy of a sparse variant of `model` on named window sets ({"fit": [n, L], ...})."""

    @torch.inference_mode()
    def __init__(self, model, windows: dict, batch: int = 4):
        self.model = model
        self.layers = blocks(model)
        self.norm = text_model(model).norm
        self.scalars = scalars(model)  # Granite divides its logits, Gemma 2 caps them
        self.targets = {k: [w[i : i + batch] for i in range(0, len(w), batch)] for k, w in windows.items()}
        self.inputs = {k: block_inputs(model, w, batch) for k, w in windows.items()}
        self.reset()
        self.dense_logp = {k: [self._logp(self._run(hs, kw, 0)) for hs, kw in v] for k, v in self.inputs.items()}

    def reset(self) -> None:
        """Back to block 0: candidates are run from the embeddings."""
        self.start = 0
        self.prefix = {k: [hs for hs, _ in v] for k, v in self.inputs.items()}

    def _run(self, hs, kws, a, b=None):
        for i, layer in enumerate(self.layers[a:b], start=a):
            hs = layer_out(layer, hs, kws[i])
        return hs

    def _logp(self, hs):
        head = self.model.get_output_embeddings()  # looked up per call: a candidate may swap in a sparse head
        return F.log_softmax(final_logits(self.scalars, head(self.norm(hs)).float()), dim=-1)

    @torch.inference_mode()
    def advance(self, modules: dict, to_block: int) -> None:
        """Move the cached hidden states from block `self.start` to `to_block`, running those
        blocks with `modules` (the incumbent's sparse modules there) swapped in."""
        with swapped(self.model, modules):
            for k, inputs in self.inputs.items():
                self.prefix[k] = [self._run(hs, kw, self.start, to_block) for hs, (_, kw) in zip(self.prefix[k], inputs)]
        self.start = to_block

    @torch.inference_mode()
    def __call__(self, modules: dict, split: str = "fit", per_token: bool = False) -> dict:
        """{"kl", "ce", "tokens"} with `modules` (sparse modules of blocks >= start) swapped in;
        `per_token` adds "kl_tokens" (windows, window) and "ce_tokens" (windows, window - 1), float64
        tensors of each token's term, for estimating how many tokens a comparison needs."""
        kls, ces = [], []
        with swapped(self.model, modules):
            for hs, (_, kw), ref, tgt in zip(self.prefix[split], self.inputs[split], self.dense_logp[split], self.targets[split]):
                logq = self._logp(self._run(hs, kw, self.start))
                kls.append((ref.exp() * (ref - logq)).sum(-1).double())
                ces.append(-logq[:, :-1].gather(-1, tgt[:, 1:, None])[..., 0].double())
        kl, ce = torch.cat(kls), torch.cat(ces)
        out = {"kl": kl.mean().item(), "ce": ce.mean().item(), "tokens": kl.numel()}
        if per_token:
            out.update(kl_tokens=kl, ce_tokens=ce)
        return out
