"""Decide: turn calibration statistics into a plan (per-projection threshold, rank, score).

Methods (`RSparseConfig.method`):
- "rsparse": kept channels + rank-r factors. allocation "uniform": every projection gets the
  model sparsity s and split alpha (the paper's recipe). allocation "auto" (default): inside
  each block, choose every projection's kept fraction kappa, rank r and channel score to minimise
  the block's sensitivity-weighted relative output errors (calibration error tables) under the
  block's byte budget (`_lagrangian`). Rank is spent only where it buys more than channels.
  `rank_multiple` and `rank_cost` (`budget.RankRule`) restrict the ranks and price factor bytes
  above kept-column bytes, for backends where they cost more time (the Triton modules: multiples
  of 16, `rank_cost` ~3 on the H200; `rsparse calibrate --target gpu`).
- "teal": |x| thresholding, r = 0; allocation "uniform" (kappa = 1 - s everywhere) or "greedy"
  (the same block-wise search restricted to r = 0 and score "abs": TEAL's block-wise greedy
  allocation, solved exactly on error tables instead of step by step).
- "cats": threshold |SiLU(gate x)| at channel sparsity s in the MLP only; its true model-level
  sparsity is lower (gate is read whole) and is what the plan reports.
- "dense": no change.
The lm_head (`head_sparsity`, rsparse and teal): its input channels thresholded at kept fraction
1 - head_sparsity on the |x_j| ||W[:, j]|| score, rank 0. A number h puts the head outside the
blocks' model-level sparsity (the method's definition covers the seven projections), so a plan
reports both: the blocks' figure and the whole model's (`Plan.expected_total_sparsity`).
`head_sparsity="auto"` puts the head inside the budget instead: `sparsity` is then the byte
sparsity of every weight a token reads, and the head's share is chosen: the table-driven plans
give the head and the blocks that sparsity each (no error table prices the head against the
blocks), and the search (`search.Space`) moves bytes between them as one more gene. Why it pays: on SmolLM2-135M the
head is 21% of the bytes a token reads, and at equal bytes per token, blocks at 42% with the head at
30% gave Wikipedia perplexity +18% where blocks at 50% with a dense head gave +35% (docs/results.md,
session 41). Why rank 0: rank terms lost to kept columns at every split tried on the head (30-70%);
the two scores gave the same perplexity there (24.54 weighted, 24.56 |x|; same section).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from .budget import RankRule, allocate, check_alpha, check_rank_rule, check_sparsity
from .calibrate import KEEPS, SCORES, Stats
from .errors import RSparseError
from .families import HEAD, locate
from .linear import column_norms, svd_basis

METHODS = ("dense", "rsparse", "teal", "cats")
AUTO = "auto"  # head_sparsity: the lm_head inside the budget, its share chosen
ALLOCATIONS = {"rsparse": ("auto", "uniform", "evo"), "teal": ("uniform", "greedy", "evo"), "cats": ("uniform",), "dense": ("uniform",)}
_FINE = np.linspace(0.0, 1.0, 201)  # kept-fraction grid for the search
_KEEPS0 = np.array((0.0,) + KEEPS)  # rows of `_table`
ALPHA_GRID = (1.0, 0.975, 0.95, 0.9, 0.8)  # uniform plans: alphas tried when none is given
# `rsparse calibrate --target`: how ranks are priced. "gpu": the Triton modules store ranks in
# multiples of 16 (kernels.module.RANK_ALIGN), and on the H200 the ranked step took 0.51-0.81 ms more
# than the r = 0 step for the same budget bytes at 40-70% (alpha 0.9, Llama-3-8B shapes; docs/perf-gpu.md
# session 29): per budget byte, about 3x what a kept column costs in the same step. Priced so, few ranks
# are bought and at 70% the allocation collapsed as TEAL-greedy does (SmolLM2 perplexity 13k, realised
# sparsity 0.77); a keep floor of 0.1 fixes that (228, against 248 for the default plan) and changes
# 40-60% by at most 1.6% (docs/results.md, sessions 29-30), so the gpu target carries it.
TARGETS = {"bytes": {"rank_multiple": 1, "rank_cost": 1.0, "min_keep": 0.0},
           "gpu": {"rank_multiple": 16, "rank_cost": 3.0, "min_keep": 0.1}}


@dataclass
class RSparseConfig:
    method: str = "rsparse"
    sparsity: float = 0.5
    allocation: str = "auto"
    alpha: float | None = None  # uniform rsparse: channel share of each budget; None: best of ALPHA_GRID
    score: str = "abs"  # uniform allocations; "auto" lets the search pick per projection
    factors: str = "aware"  # "plain": SVD of W; "aware": SVD of W C^1/2 (C: dropped-channel moments)
    rank_multiple: int = 1  # ranks chosen in multiples of this (uniform: rounded down; auto/evo: grid filtered)
    rank_cost: float = 1.0  # auto/evo: a factor byte counts as this many kept-column bytes in the budget
    min_keep: float = 0.0  # auto/greedy/evo: no projection keeps fewer than this fraction of its channels
    head_sparsity: float | str = 0.0  # rsparse/teal: the lm_head's byte sparsity (0: dense) or "auto" (`head_share`)

    def __post_init__(self):
        if self.method not in METHODS:
            raise RSparseError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS[self.method]:
            allowed = ALLOCATIONS[self.method]
            if self.method != "rsparse" and self.allocation == "auto":
                self.allocation = allowed[0]
            else:
                raise RSparseError(f"allocation {self.allocation!r} is not available for {self.method}; use {allowed}")
        self.sparsity = check_sparsity(self.sparsity)  # a float from here on (a numpy or 0-d tensor value too)
        if self.alpha is not None:
            self.alpha = check_alpha(self.alpha)
        if self.score not in SCORES + ("auto",):
            raise RSparseError(f"unknown score {self.score!r}; use abs, wnorm or auto")
        if self.factors not in ("plain", "aware"):
            raise RSparseError(f"unknown factors {self.factors!r}; use plain or aware")
        self.rank_multiple, self.rank_cost = check_rank_rule(self.rank_multiple, self.rank_cost)  # plain JSON types
        self.min_keep = check_sparsity(self.min_keep, "min_keep")  # same range, same refusals as a sparsity
        if isinstance(self.head_sparsity, str) and self.head_sparsity != AUTO:
            raise RSparseError(f"head_sparsity must be a number in [0, 1) or 'auto', got {self.head_sparsity!r}")
        if self.head_sparsity != AUTO:
            self.head_sparsity = check_sparsity(self.head_sparsity, "head_sparsity")
        if self.head_sparsity and self.method not in ("rsparse", "teal"):
            raise RSparseError(f"head_sparsity is for rsparse and teal plans (thresholded inputs); {self.method} has none")

    @classmethod
    def for_target(cls, target: str = "bytes", **kw) -> "RSparseConfig":
        """A config priced for `target` (TARGETS: "bytes", the method's accounting, or "gpu"); keyword
        arguments set any field, the target's included (`rsparse calibrate --target`)."""
        if target not in TARGETS:
            raise RSparseError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
        return cls(**{**TARGETS[target], **kw})

    def head_share(self) -> float:
        """The lm_head's byte sparsity in a table-driven plan: `head_sparsity`, or with "auto" the
        budget's own sparsity (head and blocks alike; the search tunes the split)."""
        return self.sparsity if self.head_sparsity == AUTO else self.head_sparsity

    def rank_rule(self) -> RankRule:
        """The ranks the allocation may choose: none for TEAL and CATS."""
        return RankRule(0 if self.method != "rsparse" else None, self.rank_multiple, self.rank_cost)


@dataclass
class LayerPlan:
    tau: float
    keep: float  # expected kept-channel fraction (calibration)
    rank: int = 0
    score: str = "abs"


@dataclass
class Plan:
    config: dict
    model_id: str
    fingerprint: str
    shapes: dict  # every projection "i.p" -> [out, in]
    layers: dict  # "i.p" (or "i.act" for cats) -> LayerPlan
    calibration: dict = field(default_factory=dict)
    factors: dict = field(default_factory=dict)  # "i.p" -> (U, A); saved beside the JSON
    fingerprint_fp16: str = ""  # the weights' identity through float16 (plans before session 21: none)
    head_shape: list = field(default_factory=list)  # the lm_head's [out, in] (plans before session 41: none)

    def expected_sparsity(self) -> float:
        """The blocks' model-level byte sparsity (the method's definition: the seven projections)."""
        return expected_sparsity(self.layers, self.shapes)

    def expected_total_sparsity(self) -> float | None:
        """The byte sparsity of every weight a decoded token reads (`total_sparsity`); None where the
        plan does not know the lm_head's shape (plans before session 41)."""
        return total_sparsity(self.layers, self.shapes, self.head_shape) if self.head_shape else None

    def to_json(self) -> dict:
        d = asdict(replace(self, factors={}))  # asdict deep-copies every field: not the factor tensors
        d.pop("factors")
        d["expected_sparsity"] = self.expected_sparsity()
        return d


def expected_sparsity(layers: dict, shapes: dict) -> float:
    """Model-level byte sparsity of a plan, from its expected kept fractions and ranks."""
    dense = sum(o * i for o, i in shapes.values())
    read = 0.0
    for key, (o, i) in shapes.items():
        b, p = key.split(".")
        if key in layers:
            lp = layers[key]
            read += lp.keep * o * i + lp.rank * (o + i)
        elif p in ("up", "down") and f"{b}.act" in layers:  # cats: up rows / down columns skipped
            read += layers[f"{b}.act"].keep * o * i
        else:
            read += o * i
    return 1.0 - read / dense


def total_sparsity(layers: dict, shapes: dict, head_shape) -> float:
    """1 - bytes read / dense bytes over the blocks' projections and the lm_head ([out, in]; dense
    unless `layers` has HEAD): what one decoded token reads of the model's weights."""
    o, i = head_shape
    dense = sum(a * b for a, b in shapes.values())
    head = layers.get(HEAD)
    read = (1.0 - expected_sparsity(layers, shapes)) * dense + (head.keep * o * i + head.rank * (o + i) if head else o * i)
    return 1.0 - read / (dense + o * i)


def shapes_of(model) -> dict:
    return {k: list(m.weight.shape) for k, m in locate(model).items()}


def fingerprint(model, through=torch.bfloat16) -> str:
    """Identity of the projection weights rounded to `through`: with bfloat16, equal for float32 and
    bfloat16 copies of one model; with float16, for float32 and float16 copies. (No one rounding serves
    all three: float32 -> float16 -> bfloat16 rounds some weights differently from float32 -> bfloat16,
    so a float16 copy of the bundled model has another bfloat16 identity.)"""
    h = hashlib.sha256()
    for key, mod in locate(model).items():
        h.update(key.encode())
        h.update(mod.weight.detach().to(through).contiguous().view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def plan_fits(plan: "Plan", model) -> bool:
    """Whether `plan` was calibrated on `model`'s weights: the same weights in float32 and in either
    16-bit type. A plan calibrated in float32 (the default) fits all three copies of its model."""
    if plan.fingerprint == fingerprint(model):
        return True
    return bool(plan.fingerprint_fp16) and plan.fingerprint_fp16 == fingerprint(model, torch.float16)


def _table(st, score) -> np.ndarray:
    """Error table with a kappa = 0 row prepended (linear extrapolation, never below kappa = 0.05)."""
    tab = st.err[score].double().numpy()
    return np.concatenate([np.maximum(2 * tab[0] - tab[1], tab[0])[None], tab])


def projection_options(st, shape, scores, rule: RankRule | None):
    """All (error, cost, (keep, rank, score)) choices of one projection, kappa on a fine grid, ranks
    those of the error tables that `rule` allows (None: all, at their bytes); errors are
    sensitivity-weighted (st.weight), costs in budget elements (factor bytes priced by the rule)."""
    o, i = shape
    rule = rule or RankRule()
    errs, cost, meta = [], [], []
    for score in scores:
        tab = _table(st, score)
        for ri in rule.allowed(st.ranks):
            r = st.ranks[ri]
            errs.append(np.interp(_FINE, _KEEPS0, tab[:, ri]) * st.weight)
            cost.append(_FINE * o * i + rule.elements(r, o, i))
            meta.extend((float(k), r, score) for k in _FINE)
    return np.concatenate(errs), np.concatenate(cost), meta


def floor_options(options, min_keep: float):
    """The options of one projection that keep at least `min_keep` of its channels. Why: extreme kept
    fractions drift most on new text (absolute thresholds), and at 70% allocations that use them
    collapse (docs/results.md)."""
    if min_keep <= 0:
        return options
    errs, cost, meta = options
    ok = np.array([m[0] >= min_keep - 1e-9 for m in meta])
    return errs[ok], cost[ok], [m for m, o in zip(meta, ok) if o]


def solve_block(opts: dict, budget: float, mult: dict | None = None) -> dict:
    """Lagrangian allocation inside one block: each projection k takes argmin mult_k * err + lambda
    * bytes, lambda bisected until the block's bytes fit `budget` (never above it). `mult` scales a
    projection's errors (1 by default; the search tunes it)."""
    mult = mult or {}

    def solve(lam):
        pick, total = {}, 0.0
        for k, (e, c, meta) in opts.items():
            j = int(np.argmin(mult.get(k, 1.0) * e + lam * c))
            pick[k] = meta[j]
            total += float(c[j])
        return pick, total

    lo, hi = 0.0, 1e-12
    while solve(hi)[1] > budget:
        lo, hi = hi, hi * 4
        if hi > 1e6:
            raise RSparseError(f"a block budget of {budget:.0f} elements cannot be met with the available options")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if solve(mid)[1] <= budget else (mid, hi)
    return _fill(opts, mult, *solve(hi), budget)


def _fill(opts: dict, mult: dict, pick: dict, total: float, budget: float) -> dict:
    """Spend what the Lagrangian left of the budget (its solutions jump between hull vertices):
    repeatedly take the single-projection upgrade that fits and removes the most error per byte."""
    idx = {k: opts[k][2].index(pick[k]) for k in opts}
    while True:
        best = None
        for k, (e, c, meta) in opts.items():
            j0 = idx[k]
            extra = c - c[j0]
            gain = mult.get(k, 1.0) * (e[j0] - e)
            ok = (extra > 0) & (extra <= budget - total) & (gain > 0)
            if ok.any():
                ratio = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
                j = int(np.argmax(ratio))
                if best is None or ratio[j] > best[0]:
                    best = (ratio[j], k, j)
        if best is None:
            return {k: opts[k][2][j] for k, j in idx.items()}
        _, k, j = best
        total += float(opts[k][1][j] - opts[k][1][idx[k]])
        idx[k] = j


def block_keys(keys) -> dict:
    """{block index: [projection keys]} in model order."""
    out: dict[int, list] = {}
    for key in keys:
        out.setdefault(int(key.split(".")[0]), []).append(key)
    return out


def block_picks(stats: Stats, shapes: dict, block_sparsity: dict, scores, rule: RankRule | None,
                mult: dict | None = None, options: dict | None = None, min_keep: float = 0.0) -> dict:
    """(keep, rank, score) of every projection of the blocks in `block_sparsity` ({block: s_b}):
    block b reads at most (1 - s_b) x its dense bytes, split among its projections by
    `solve_block`. `options` may carry precomputed `projection_options` (the search reuses them)."""
    picks = {}
    for b, keys in block_keys(stats.proj).items():
        if b not in block_sparsity:
            continue
        opts = {k: options[k] if options else floor_options(projection_options(stats.proj[k], shapes[k], scores, rule), min_keep)
                for k in keys}
        budget = (1.0 - block_sparsity[b]) * sum(shapes[k][0] * shapes[k][1] for k in keys)
        picks.update(solve_block(opts, budget, mult))
    return picks


def _lagrangian(stats: Stats, shapes: dict, sparsity: float, scores, rule: RankRule, min_keep: float = 0.0) -> dict:
    """Blocks share the model sparsity uniformly, as in TEAL's block-wise greedy allocation;
    inside each block the allocation minimises the summed sensitivity-weighted relative errors."""
    return block_picks(stats, shapes, {b: sparsity for b in block_keys(stats.proj)}, scores, rule, min_keep=min_keep)


def _uniform(shapes: dict, s: float, alpha: float, score: str, multiple: int = 1) -> dict:
    picks = {}
    for key, (o, i) in shapes.items():
        a = allocate(o, i, s, alpha, multiple)
        picks[key] = (a.keep, a.rank, score)
    return picks


def _uniform_error(stats: Stats, shapes: dict, s: float, alpha: float, score: str, multiple: int = 1) -> float:
    """Sum of sensitivity-weighted relative errors of a uniform plan, read off the error tables."""
    total = 0.0
    for key, (keep, rank, _) in _uniform(shapes, s, alpha, score, multiple).items():
        st = stats.proj[key]
        tab = _table(st, score)
        r_idx = max(i for i, r in enumerate(st.ranks) if r <= rank)  # nearest tabulated rank below
        total += st.weight * float(np.interp(keep, _KEEPS0, tab[:, r_idx]))
    return total


def _aware_whitening(sample: torch.Tensor, keep_mask_fn) -> torch.Tensor:
    """Cholesky factor of the second moment of the dropped part of the sample rows."""
    Z = torch.where(keep_mask_fn(sample), 0.0, sample).double()
    C = Z.T @ Z / max(len(Z), 1)
    eps = 1e-6 * C.diagonal().mean().clamp_min(1e-12) + 1e-12
    return torch.linalg.cholesky(C + eps * torch.eye(len(C), dtype=C.dtype))


def need_ranks(stats: Stats) -> None:
    """Refuse statistics whose error tables hold rank 0 only (collected for TEAL/CATS, without SVDs)
    where an allocation chooses ranks from them: it would silently choose rank 0 everywhere."""
    if max(stats.config.get("ranks", [1])) == 0:
        raise RSparseError("these calibration statistics tabulate rank 0 only (collected for a method without "
                           "rank terms); collect them with the default ranks for an rsparse plan")


def need_tables(stats: Stats, scores) -> None:
    """Refuse statistics without the error tables an allocation reads (collected for a plan that reads
    the histograms alone: CATS, uniform TEAL, uniform R-Sparse with a given alpha)."""
    missing = [sc for sc in scores if not all(sc in st.err for st in stats.proj.values())]
    if missing or not stats.proj:
        raise RSparseError(f"calibration statistics lack error tables for score {(missing or scores)[0]!r} (collected for a "
                           "plan that reads the histograms alone); collect them again for this allocation")


def refuse_search_only(config: RSparseConfig) -> None:
    """An evo allocation is what the search writes into its plan's config: no calibration builds one."""
    if config.allocation == "evo":
        raise RSparseError("evo allocations come from the search: rsparse calibrate --search evo (rsparse.search_plan)")


def config_picks(stats: Stats, shapes: dict, config: RSparseConfig) -> tuple[dict, float | None]:
    """(keep, rank, score) per projection for a teal/rsparse config, and the alpha a uniform
    R-Sparse plan chose from ALPHA_GRID (None otherwise)."""
    s = config.sparsity
    refuse_search_only(config)
    if config.method == "teal" and config.allocation == "greedy":
        need_tables(stats, ("abs",))
        return _lagrangian(stats, shapes, s, ("abs",), config.rank_rule(), config.min_keep), None
    if config.method == "rsparse" and config.allocation == "auto":
        scores = SCORES if config.score == "auto" else (config.score,)
        need_tables(stats, scores)
        need_ranks(stats)
        return _lagrangian(stats, shapes, s, scores, config.rank_rule(), config.min_keep), None
    score = "abs" if config.method == "teal" else ("abs" if config.score == "auto" else config.score)
    alpha, chosen = (1.0 if config.method == "teal" else config.alpha), None
    if alpha is None:  # the alpha of the grid with the least weighted calibration error
        need_tables(stats, (score,))
        need_ranks(stats)
        alpha = chosen = min(ALPHA_GRID, key=lambda a: _uniform_error(stats, shapes, s, a, score, config.rank_multiple))
    return _uniform(shapes, s, alpha, score, config.rank_multiple), chosen


HEAD_SCORE = "wnorm"


def head_pick(h: float) -> dict:
    """{HEAD: (keep, rank, score)} of an lm_head at byte sparsity h (module docstring; at 0 a dense
    head, which `layers_from_picks` leaves out like any dense pick)."""
    return {HEAD: (1.0 - h, 0, HEAD_SCORE)}


def layers_from_picks(stats: Stats, picks: dict) -> dict:
    """LayerPlans (threshold from the score histogram) of the non-dense picks, the lm_head's included."""
    layers = {}
    for key, (keep, rank, score) in picks.items():
        if keep >= 1.0 and rank == 0:
            continue  # dense: leave the nn.Linear untouched
        if key == HEAD and stats.head is None:
            raise RSparseError("these calibration statistics have no lm_head histogram (collected before session 41 or "
                               "for a model without an lm_head); collect them again to sparsify the head")
        st = stats.head if key == HEAD else stats.proj[key]
        layers[key] = LayerPlan(tau=st.hist[score].quantile(1.0 - keep), keep=keep, rank=rank, score=score)
    return layers


def plan_layers(stats: Stats, config: RSparseConfig, picks: dict) -> dict:
    """LayerPlans of `picks` with the config's lm_head laid under them (a HEAD pick of their own wins:
    the search's, when the head's share is a gene)."""
    return layers_from_picks(stats, {**head_pick(config.head_share()), **picks})


def factor_basis(W: torch.Tensor, st, lp: LayerPlan, kind: str):
    """Full-rank (U, A) whose first r columns / rows are the rank-r factors of `lp` (see
    `linear.svd_basis`); "aware" whitens with the moments of the channels `lp` drops."""
    whiten = None
    if kind == "aware":
        col = column_norms(W) if lp.score == "wnorm" else torch.ones(W.shape[1])
        whiten = _aware_whitening(st.sample[0], lambda x: x.abs() * col > lp.tau)
    return svd_basis(W, whiten)


def factors_of(model, stats: Stats, layers: dict, kind: str, basis=None) -> dict:
    """{key: (U_r, A_r)} in the model dtype for every ranked layer; `basis(key, W, lp)` may be a
    cache around `factor_basis` (the search reuses bases across candidates)."""
    projs = locate(model)
    out = {}
    for key, lp in layers.items():
        if lp.rank == 0:
            continue
        W = projs[key].weight.detach()  # weights of a model loaded by hand require grad; factors are values
        U, A = basis(key, W, lp) if basis else factor_basis(W, stats.proj[key], lp, kind)
        out[key] = (U[:, : lp.rank].to(W.dtype).contiguous(), A[: lp.rank].to(W.dtype).contiguous())
    return out


def build_plan(model, stats: Stats, config: RSparseConfig, picks: dict | None = None, basis=None) -> Plan:
    """The decide step: statistics + config -> Plan (with factors for ranked projections).
    `picks` overrides the allocation (the search passes the one it found; without a HEAD pick the
    lm_head follows the config)."""
    shapes = shapes_of(model)
    layers, chosen_alpha = {}, None
    if config.method == "cats":
        for key, hist in stats.act.items():
            layers[key] = LayerPlan(tau=hist.quantile(config.sparsity), keep=1.0 - config.sparsity)
    elif config.method in ("teal", "rsparse") and config.sparsity > 0:
        if picks is None:
            picks, chosen_alpha = config_picks(stats, shapes, config)
        layers = plan_layers(stats, config, picks)
    head = getattr(model, "lm_head", None)
    plan = Plan(
        config=asdict(config),
        model_id=getattr(model, "rsparse_model_id", "unknown"),
        fingerprint=fingerprint(model),
        fingerprint_fp16=fingerprint(model, torch.float16),
        shapes=shapes,
        layers=layers,
        calibration=dict(stats.config, tokens=stats.tokens),
        head_shape=list(head.weight.shape) if head is not None else [],
    )
    if chosen_alpha is not None:
        plan.calibration["alpha_chosen"] = chosen_alpha
    plan.factors = factors_of(model, stats, layers, config.factors, basis)
    return plan


def summarize(plan: Plan) -> str:
    auto = plan.config.get("head_sparsity") == AUTO
    lines = [f"method={plan.config['method']} target={plan.config['sparsity']:.2f}{' (blocks and lm_head)' if auto else ''} "
             f"expected={plan.expected_sparsity():.4f}"]
    if plan.config.get("rank_cost", 1.0) != 1.0 or plan.config.get("rank_multiple", 1) != 1:
        lines[0] += f" (ranks in multiples of {plan.config['rank_multiple']}, factor bytes priced x{plan.config['rank_cost']:g})"
    if plan.config.get("min_keep", 0.0) > 0:
        lines[0] += f" (every projection keeps >= {plan.config['min_keep']:g} of its channels)"
    if "refined" in plan.calibration:
        lines[0] += f" (thresholds refined on {plan.calibration['refined']['tokens']} tokens through the sparse model)"
    total = plan.expected_total_sparsity()
    if total is not None:
        lines[0] += f"; with the lm_head {'at ' + format(1 - plan.layers[HEAD].keep, '.2f') if HEAD in plan.layers else 'dense'}, " \
                    f"every weight a token reads: {total:.4f}"
    by_proj = {}
    for key, lp in plan.layers.items():
        by_proj.setdefault(key.split(".")[-1], []).append(lp)
    for p, lps in by_proj.items():
        keep = sum(lp.keep for lp in lps) / len(lps)
        rank = sum(lp.rank for lp in lps) / len(lps)
        lines.append(f"  {p:5s} n={len(lps):3d} mean keep={keep:.3f} mean rank={rank:.1f}")
    return "\n".join(lines)
