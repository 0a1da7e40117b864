"""High-level verbs: observe -> decide -> apply in one call, for the CLI and for users.

    model, tok = rsparse.load("smollm2-135m")
    plan = rsparse.calibrate(model, tok, RSparseConfig(sparsity=0.5))
    rsparse.save_plan(plan, "out/plan50")          # or later: rsparse.load_sparsified(model, "out/plan50")
    rsparse.sparsify_(model, plan)
"""
from __future__ import annotations

import math
import numbers

from . import artifact, data
from .apply import sparsify_, swapped
from .atomic import write_json
from .calibrate import Stats, collect
from .errors import RSparseError
from .plan import SCORES, Plan, RSparseConfig, build_plan, refuse_search_only

DEFAULT_CALIB_TOKENS = 65536
DEFAULT_CALIB_LENGTH = 1024
DEFAULT_REFINE_TOKENS = 16384  # at most; ~50 s on 2 cores for SmolLM2 (session 31)


def calibration_windows(tokenizer, source: str = "wiki", tokens: int = DEFAULT_CALIB_TOKENS,
                        length: int = DEFAULT_CALIB_LENGTH, seed: int = 0):
    if tokens < length:
        raise RSparseError(f"calibration needs at least one window: {tokens} tokens < window length {length}")
    return data.token_windows(tokenizer, source, "calib" if source in data.SOURCES else "eval", length, n=tokens // length, seed=seed)


def observe(model, tokenizer, source: str = "wiki", tokens: int = DEFAULT_CALIB_TOKENS,
            length: int = DEFAULT_CALIB_LENGTH, seed: int = 0, progress: bool = True, **collect_kw) -> Stats:
    stats = collect(model, calibration_windows(tokenizer, source, tokens, length, seed), progress=progress, **collect_kw)
    stats.config.update(source=source, seed=seed)
    return stats


def collection_for(config: RSparseConfig, search: bool = False) -> dict:
    """The `collect` arguments for what a plan of `config` (or its search) reads: the error tables of
    its scores, at rank 0 alone (no SVDs) for the methods without rank terms; none (nor the
    sensitivities that weight them) where the plan reads the histograms alone: CATS, uniform TEAL,
    uniform R-Sparse with a given alpha. Tables are the costly part of a calibration (teal at 1024
    tokens on SmolLM2: 167 s with them, session 42)."""
    tableless = config.method == "cats" or (config.allocation == "uniform" and (config.method == "teal" or config.alpha is not None))
    if tableless and not search:
        return {"scores": (), "ranks": (0,)}
    scores = ("abs",) if config.method == "teal" else (SCORES if config.score == "auto" else (config.score,))
    return {"scores": scores} if config.method == "rsparse" else {"scores": scores, "ranks": (0,)}


def calibrate(model, tokenizer, config: RSparseConfig, stats: Stats | None = None,
              refine_tokens: int | None = None, **observe_kw) -> Plan:
    """A plan for `model` under `config`; pass `stats` to reuse one calibration for many plans.
    The thresholds of rsparse and TEAL plans are then refined on `refine_tokens` tokens (default:
    the calibration's own, at most DEFAULT_REFINE_TOKENS) of the calibration text pushed through the
    sparse model itself (`refine`; 0: the dense-activation thresholds as they are, which keep fewer
    channels than planned at high sparsity)."""
    if not isinstance(config, RSparseConfig):
        raise RSparseError(f"calibrate takes an RSparseConfig (e.g. rsparse.RSparseConfig(sparsity=0.5)), "
                           f"got {type(config).__name__}")
    _check_refine_tokens(refine_tokens)  # before the calibration pass, not after it
    refuse_search_only(config)
    if config.method == "dense":
        stats = stats or Stats(proj={}, act={}, tokens=0, config={})
    elif stats is None:
        stats = observe(model, tokenizer, **{**collection_for(config), **observe_kw})
    plan = build_plan(model, stats, config)
    return refine(model, tokenizer, plan, refine_tokens, stats)


def _check_refine_tokens(tokens) -> None:
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0):
        raise RSparseError(f"refinement tokens must be a whole number >= 0 (0: no refinement), got {tokens!r}")


def refine(model, tokenizer, plan: Plan, tokens: int | None = None, stats: Stats | None = None) -> Plan:
    """`plan` with its thresholds re-derived on the activations of the model it sparsifies, so that each
    projection keeps its planned fraction given the sparse blocks before it (`refine.refine_thresholds_`).
    The text is the first `tokens` tokens (default: min(DEFAULT_REFINE_TOKENS, the calibration's)) of
    the calibration text, seed and window length `stats` were collected with. `model` is sparsified
    only while this runs. Plans without thresholds to refine (dense, CATS) pass through."""
    from .apply import modules_for, sparse_modules
    from .refine import refine_thresholds_

    cfg = stats.config if stats is not None else {}
    if tokens is None:
        tokens = min(DEFAULT_REFINE_TOKENS, stats.tokens) if stats is not None and stats.tokens else DEFAULT_REFINE_TOKENS
    _check_refine_tokens(tokens)
    if plan.config["method"] not in ("rsparse", "teal") or not plan.layers or tokens == 0:
        return plan
    if sparse_modules(model):
        raise RSparseError("refine needs the dense model the plan was calibrated on; this one is already sparsified")
    length = cfg.get("windows", (0, DEFAULT_CALIB_LENGTH))[1]
    windows = calibration_windows(tokenizer, cfg.get("source", "wiki"), max(tokens, length), length, cfg.get("seed", 0))
    with swapped(model, modules_for(model, plan.layers, plan.factors)):
        return refine_thresholds_(model, plan, windows)


def save_plan(plan: Plan, directory):
    return artifact.save(plan, directory)


def load_sparsified(model, directory):
    """Restore a saved plan onto `model` (checked against its weights) without recalibration."""
    return sparsify_(model, artifact.load(directory))


def search_windows(tokenizer, stats: Stats, cfg, source: str = "wiki") -> dict:
    """Fitness and validation windows from the calibration text, disjoint from the windows the
    statistics were collected on (the next windows of the same seeded order) and from the
    evaluation split."""
    n_stats, length = stats.config["windows"]
    need = -(-(cfg.fitness_tokens + cfg.val_tokens) // length)
    allw = calibration_windows(tokenizer, source, (n_stats + need) * length, length, stats.config.get("seed", 0))
    extra = allw[n_stats:]
    w = extra.reshape(-1, cfg.window) if length % cfg.window == 0 else extra[:, : cfg.window]
    n_fit = max(1, cfg.fitness_tokens // cfg.window)
    n_val = max(1, cfg.val_tokens // cfg.window)
    if len(w) < n_fit + n_val:
        raise RSparseError(f"--window {cfg.window} leaves {len(w)} windows; {n_fit} + {n_val} are needed")
    return {"fit": w[:n_fit], "val": w[n_fit : n_fit + n_val]}


def search_plan(model, tokenizer, config: RSparseConfig, search_config, directory, stats: Stats | None = None,
                baselines: bool = True, progress=print, refine_tokens: int = 0, **observe_kw) -> Plan:
    """Evolutionary per-layer allocation (see `search`), written to `directory` as a plan
    artifact; the search state beside it makes a rerun resume where it stopped. The candidates are
    scored with the dense-activation thresholds, so by default the found plan keeps them (its recorded
    fitness is then its own); `refine_tokens` > 0 refines them afterwards as `calibrate` does."""
    import json
    from collections import OrderedDict
    from dataclasses import replace
    from pathlib import Path

    from .apply import modules_for
    from .fitness import Fitness
    from .plan import AUTO, factor_basis, factors_of, fingerprint, need_ranks, need_tables, plan_layers, shapes_of
    from .search import Search, Space, refuse_other, search_identity

    if config.method not in ("rsparse", "teal") or config.sparsity <= 0:
        raise RSparseError("the search allocates rsparse or teal plans at a sparsity > 0")
    teal = config.method == "teal"
    collection = collection_for(config, search=True)
    scores = collection["scores"]
    # one floor, from either config, so that the search's identity records the one it searched under
    search_config = replace(search_config, min_keep=max(search_config.min_keep, config.min_keep))
    identity = {"model": fingerprint(model), "method": config.method, "scores": list(scores), "factors": config.factors}
    if not teal and (config.rank_multiple, config.rank_cost) != (1, 1.0):  # absent at the defaults: older searches resume
        identity["ranks"] = {"multiple": config.rank_multiple, "cost": config.rank_cost}
    if config.head_sparsity:  # absent with a dense head: older searches resume
        identity["head_sparsity"] = config.head_sparsity
    auto = config.head_sparsity == AUTO
    head_out = model.get_output_embeddings()
    if auto and head_out is None:
        raise RSparseError("head_sparsity='auto' searches the lm_head's share of the budget; this model has no lm_head")
    refuse_other(directory, search_identity(search_config, config.sparsity, **identity))  # before minutes of calibration
    if stats is None:
        stats = observe(model, tokenizer, progress=progress is not None, **{**collection, **observe_kw})
    else:
        need_tables(stats, scores)
        if not teal:
            need_ranks(stats)
    shapes = shapes_of(model)
    space = Space(stats, shapes, config.sparsity, scores, config.rank_rule(), search_config.min_keep,
                  head=list(head_out.weight.shape) if auto else None)
    fitness = Fitness(model, search_windows(tokenizer, stats, search_config, stats.config.get("source", "wiki")))
    cache: OrderedDict = OrderedDict()

    def basis(key, W, lp):
        """SVD bases reused across candidates (LRU, ~5 MB each). Activation-aware factors whiten with
        the moments of the channels dropped at the kept fraction rounded *down* to 0.05: every
        candidate would otherwise need its own SVDs (one per ranked projection, ~0.3 s each); searched
        plans are built with the same rounding, so the fitness is the final plan's. Down, so the
        whitened set contains every dropped channel: rounding a keep of 0.02 up to 0.05 (as before
        session 4) left the largest dropped channels out of the factors' objective, and such a plan's
        KL at 70% was 6.8 where the same allocation with exact factors has 2.5."""
        kq = basis_keep(lp.keep)
        ck = (key, kq, lp.score) if config.factors == "aware" else (key,)  # plain bases ignore the kept set
        if ck not in cache:
            tau = stats.proj[key].hist[lp.score].quantile(1.0 - kq)
            lq = replace(lp, keep=kq, tau=tau)
            cache[ck] = tuple(t.to(W.dtype) for t in factor_basis(W, stats.proj[key], lq, config.factors))
            if len(cache) > 256:
                cache.popitem(last=False)
        cache.move_to_end(ck)
        return cache[ck]

    def modules(picks):  # every candidate is scored with the plan's own lm_head (auto: the genome's, in the picks)
        layers = plan_layers(stats, config, picks)
        return modules_for(model, layers, factors_of(model, stats, layers, config.factors, basis))

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "evaluations.jsonl"

    def evaluate(picks, start, split):
        r = fitness(modules(picks), split)
        with open(log, "a") as f:
            f.write(json.dumps({"split": split, "start": start, **r}) + "\n")
        return r[search_config.fitness]

    identity["calibration"] = {k: stats.config.get(k) for k in ("windows", "seed", "source")}
    state = Search(space, search_config, directory, evaluate, lambda picks, a, b: fitness.advance(modules(picks), b),
                   identity, progress=progress or (lambda *_: None)).run()
    out_cfg = replace(config, allocation="evo")
    plan = refine(model, tokenizer, build_plan(model, stats, out_cfg, picks=space.decode(state["incumbent"]), basis=basis),
                  refine_tokens, stats)
    plan.calibration["search"] = {"config": search_config.identity(), "seconds": round(state["seconds"], 1),
                                  "evaluations": state["evaluations"], "fitness": search_config.fitness,
                                  "fit": state["incumbent_fit"], "val": state["incumbent_val"],
                                  "seed_fit": state["seed_fit"], "seed_val": state["seed_val"], "stopped": state.get("stopped")}
    if baselines:
        plan.calibration["search"]["baselines"] = _baselines(directory, fitness, modules, stats, shapes, config,
                                                             search_config.fitness)
    artifact.save(plan, directory)
    return plan


def basis_keep(keep: float) -> float:
    """The kept fraction the search's basis cache whitens at: `keep` rounded down to 0.05."""
    return min(1.0, max(0.0, math.floor(keep * 20 + 1e-9) / 20))


# the standard allocations a search is compared with (RSparseConfig fields besides the sparsity)
BASELINES = {"teal-uniform": dict(method="teal", allocation="uniform"),
             "teal-greedy": dict(method="teal", allocation="greedy"),
             "rsparse-uniform": dict(method="rsparse", allocation="uniform"),
             "rsparse-auto": dict(method="rsparse", allocation="auto")}


def _baselines(directory, fitness, modules, stats, shapes, config, measure: str) -> dict:
    """Fitness (`measure`) of the standard allocations on the same fitness / validation windows (from block 0),
    cached in DIR/baselines.json."""
    import json
    from pathlib import Path

    from .plan import config_picks

    path = Path(directory) / "baselines.json"
    if path.is_file():
        return json.loads(path.read_text())
    fitness.reset()
    out = {}
    for name, kw in BASELINES.items():
        picks, _ = config_picks(stats, shapes, RSparseConfig(sparsity=config.sparsity, **kw))
        mods = modules(picks)  # with the config's lm_head (auto: at the budget's sparsity, as a table-driven plan has it)
        out[name] = {split: fitness(mods, split)[measure] for split in ("fit", "val")}
    write_json(path, out)
    return out
