"""Apply: swap modules according to a plan, and the helpers that depend on the swapped model.

`sparsify_(model, plan)` replaces each planned projection by `RSparseLinear.from_linear` (or the
MLP activation by `ThresholdedActivation` for CATS) in place; nothing else in the model changes.
`dense_view(model)` temporarily swaps every sparse module back to its dense twin (same weight
storage): the decode protocol prefills prompts through it. `counting_kept` (around any evaluation) and
`measure_sparsity` (its own forwards) count the kept channels the plan really gets on some text: the
realised model-level byte sparsity.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .artifact import load as load_plan
from .errors import RSparseError
from .families import attached_groups, get_act, locate, set_group, set_module, swappable
from .linear import RSparseLinear, ThresholdedActivation
from .plan import Plan, plan_fits

SPARSE_TYPES = (RSparseLinear, ThresholdedActivation)


def sparse_modules(model) -> dict:
    """{key: module} of every sparse module: projections "i.p", CATS activations "i.act", the lm_head "head"."""
    out = {k: m for k, m in swappable(model).items() if isinstance(m, SPARSE_TYPES)}
    for b in range(len({k.split(".")[0] for k in locate(model)})):
        act = get_act(model, b)
        if isinstance(act, SPARSE_TYPES):
            out[f"{b}.act"] = act
    return out


def backend_candidates(model, backend: str) -> dict:
    """`sparse_modules(model)` for a backend swap, with a warning where there are none: a dense model
    given to `to_cpu_backend_` / `to_triton_` would otherwise run dense, silently."""
    out = sparse_modules(model)
    if not out:
        warnings.warn(f"{backend}: the model has no sparse modules (sparsify_ it with a plan first); nothing swapped",
                      stacklevel=3)
    return out


def sparsify_(model, plan: Plan | str | os.PathLike, check: bool = True):
    """Swap the planned modules of `model` in place; `plan`: a Plan or the directory `save_plan` wrote.
    Returns the model."""
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    elif not isinstance(plan, Plan):
        raise RSparseError(f"sparsify_ takes a Plan or a plan directory, got {type(plan).__name__}")
    if sparse_modules(model):
        raise RSparseError("model is already sparsified; load a fresh copy")
    if check and not plan_fits(plan, model):
        raise RSparseError(f"plan was calibrated for another model ({plan.model_id}); its weight fingerprint does not match"
                           + ("" if plan.fingerprint_fp16 else " (a plan written before float16 fingerprints fits only float32 "
                              "and bfloat16 copies of its model: calibrate it again for float16)"))
    for key, mod in modules_for(model, plan.layers, plan.factors).items():
        set_module(model, key, mod)
    return model


def modules_for(model, layers: dict, factors: dict) -> dict:
    """{key: sparse module} for planned layers ("i.p" projections, "i.act" for CATS, "head")."""
    projs, out = swappable(model), {}
    for key, lp in layers.items():
        block, _, p = key.partition(".")
        if p == "act":
            out[key] = ThresholdedActivation(get_act(model, int(block)), lp.tau)
            continue
        U, A = factors.get(key, (None, None))
        if lp.rank and U is None:
            raise RSparseError(f"plan gives {key} rank {lp.rank} but carries no factors for it")
        out[key] = RSparseLinear.from_linear(projs[key], lp.tau, lp.score, U, A, lp.keep)
    return out


@contextlib.contextmanager
def swapped(model, modules: dict):
    """Within the block, the modules at the given keys are replaced; the old ones come back after."""
    old = {k: set_module(model, k, m) for k, m in modules.items()}
    try:
        yield model
    finally:
        for k, m in old.items():
            set_module(model, k, m)


@contextlib.contextmanager
def dense_view(model):
    """Within the block, every sparse module is replaced by its dense equivalent and fused groups
    (which hold the sparse members) are detached."""
    groups = attached_groups(model)
    for i, name in groups:
        set_group(model, i, name, None)
    try:
        with swapped(model, {k: m.dense() for k, m in sparse_modules(model).items()}):
            yield model
    finally:
        for (i, name), m in groups.items():
            set_group(model, i, name, m)


@contextlib.contextmanager
def counting_kept(model, shapes: dict):
    """Within the block, every sparse module counts the channels it keeps on the tokens it sees (dense
    prefills through `dense_view` are not seen); on exit the yielded dict gets "sparsity" (the realised
    model-level byte sparsity), "keep" (each module's kept fraction) and "layers" (both as LayerPlans,
    for `plan.total_sparsity`). Wrapping an evaluation in it measures the realised sparsity on all of
    the evaluated text at no extra forward pass: on a handful of windows it is noisy (SmolLM2, TEAL-greedy at 70%: 0.66-0.74 over 4,096-token chunks, session 32)."""
    mods = sparse_modules(model)
    kept = {k: [0, 0] for k in mods}

    def hook_for(key):
        def hook(mod, args):
            mask = mod.keep_mask(args[0])
            kept[key][0] += mask.sum()  # a tensor: no host sync per call
            kept[key][1] += mask.numel()

        return hook

    out: dict = {}
    hooks = [m.register_forward_pre_hook(hook_for(k)) for k, m in mods.items()]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
    from .plan import LayerPlan, expected_sparsity

    layers = {k: LayerPlan(tau=float(m.tau), keep=float(kept[k][0]) / max(kept[k][1], 1), rank=getattr(m, "rank", 0))
              for k, m in mods.items()}
    out.update(sparsity=expected_sparsity(layers, shapes), keep={k: v.keep for k, v in layers.items()}, layers=layers)


@torch.inference_mode()
def measure_sparsity(model, windows: torch.Tensor, shapes: dict) -> dict:
    """Realised kept fractions on `windows` and the model-level byte sparsity they give."""
    with counting_kept(model, shapes) as real:
        for w in windows:
            model(w[None])
    return real
