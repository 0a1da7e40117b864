"""The GPU benchmark's model: Llama-architecture shapes with random bf16 (or fp16) weights on the GPU, the
activations its own prefill gives, and Triton modules for every projection (and, with `with_head`, the lm_head) with thresholds set from
those activations (`modules_at`, `sparse_samples`, `set_thresholds`).

Speed depends on how many channels pass each threshold, not on the weights' values: thresholds
are quantiles of each projection's own sampled |x|, so the kept fractions are the target's. The
samples are taken in the *sparse* model's prefill, each threshold set before its projection runs
(`sparse_samples`, the refinement `rsparse.refine` applies to calibrated plans): taken in the dense
model's (`input_samples`, sessions 1-30), the thresholds of a 32-layer random Llama (4x narrower than
Llama-3-8B, CPU, session 31) realised 0.512 at a 50% target and 0.738 at 70% (o_proj of the last
block kept 0.021 of its channels instead of 0.3), so those sessions' sparse steps ran at slightly
more sparsity than their labels.
"""
import contextlib

import torch

from .families import HEAD, locate, set_group
from .budget import allocate
from .kernels.module import RANK_ALIGN, TritonRSparseLinear
from .linear import RSparseLinear

MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
}


def build(name, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**MODELS[name])).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model.to(dtype)


@torch.inference_mode()
def input_samples(model, tokens=1024):
    """|x| rows at every projection input over a prefill of random tokens (a subsample of rows)."""
    projs, samples, hooks = locate(model), {}, []
    def hook_for(key):
        def hook(_mod, args):  # returns None: the module's input is left alone
            samples[key] = _sampled_rows(args[0])
        return hook

    for key, mod in projs.items():
        hooks.append(mod.register_forward_pre_hook(hook_for(key)))
    try:
        model(_prefill_ids(model, tokens), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return samples


def _sampled_rows(x):
    """|x| of every 4th token row, float32: what a projection's threshold is a quantile of."""
    return x.reshape(-1, x.shape[-1])[::4].float().abs()


def _prefill_ids(model, tokens):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (4, tokens // 4), generator=gen).to(next(model.parameters()).device)


@torch.inference_mode()
def sparse_samples(model, sparse: dict, quantile: dict, sparsity: float, tokens=1024) -> dict:
    """Every module of `sparse` gets its threshold, in place, from the sparse model's own prefill: a
    pre-hook takes |x| rows at the module's input (`_sampled_rows`, as `input_samples`) and sets tau to the
    quantile that keeps the module's fraction (`quantile`, else `sparsity`) before the module runs, so
    each projection sees inputs that already went through the thresholded ones before it. Returns
    those samples ({key: rows}); `set_thresholds(taus, samples, quantile, sparsity)` sets the same
    thresholds again from them."""
    from .apply import swapped

    samples, hooks = {}, []

    def hook_for(key, q):
        def hook(mod, args):  # returns None: the module's input is left alone
            x = samples[key] = _sampled_rows(args[0])
            mod.tau.fill_(torch.quantile(x.reshape(-1), q).item())
        return hook

    for key, mod in sparse.items():
        hooks.append(mod.register_forward_pre_hook(hook_for(key, quantile.get(key, sparsity))))
    try:
        with swapped(model, sparse):
            model(_prefill_ids(model, tokens), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return samples


@contextlib.contextmanager
def attached(model, groups):
    for (i, name), g in groups.items():
        set_group(model, i, name, g)
    try:
        yield
    finally:
        for i, name in groups:
            set_group(model, i, name, None)


def modules_at(projs, sparsity, alpha, decide_rows=True):
    """Triton modules for every projection, r = 0 (alpha = 1) or, for alpha < 1, with the rank the
    budget gives (`budget.allocate` at the modules' stored multiple, RANK_ALIGN) and random factors of that rank (speed does not depend on
    their values); and {key: quantile of |x| that keeps that projection's fraction} (empty for
    alpha = 1: the sparsity itself). decide_rows: the modules know their kept fraction, so batches
    past their `max_rows` run dense, as a calibrated plan's would (off: every batch on the kernels,
    for a sweep of several sparsities over the same modules)."""
    mods, quantile = {}, {}
    for k, lin in projs.items():
        out_f, in_f = lin.weight.shape
        if alpha >= 1.0:
            mods[k] = TritonRSparseLinear(RSparseLinear.from_linear(lin, 0.0, keep=1.0 - sparsity if decide_rows else None))
            continue
        al = allocate(out_f, in_f, sparsity, alpha, RANK_ALIGN)
        U = (torch.randn(out_f, al.rank, device=lin.weight.device) / 8).to(lin.weight.dtype) if al.rank else None
        A = (torch.randn(al.rank, in_f, device=lin.weight.device) / in_f**0.5).to(lin.weight.dtype) if al.rank else None
        mods[k] = TritonRSparseLinear(RSparseLinear.from_linear(lin, 0.0, "abs", U, A, al.keep if decide_rows else None))
        quantile[k] = 1.0 - al.keep
    return mods, quantile


def with_head(projs: dict, sparse: dict, quantile: dict, model, head_sparsity: float) -> None:
    """Add the lm_head, in place, to the projections, their Triton modules and quantiles at
    `head_sparsity` (r = 0, as `plan.head_pick` plans it); nothing at 0 (the head stays dense)."""
    if not head_sparsity:
        return
    projs[HEAD] = model.lm_head
    sparse[HEAD] = TritonRSparseLinear(RSparseLinear.from_linear(model.lm_head, 0.0, keep=1.0 - head_sparsity))
    quantile[HEAD] = head_sparsity


def set_thresholds(taus, samples, quantile: dict, sparsity: float) -> None:
    """Every projection's threshold, in place (captured graphs read these tensors): the quantile of
    its sampled |x| that `quantile` gives it (rank terms, --alpha), else `sparsity`."""
    for k, x in samples.items():
        taus[k].fill_(torch.quantile(x.reshape(-1), quantile.get(k, sparsity)).item())
