"""Evolutionary search of the per-projection allocation (kept fraction, rank) under a model budget.

Search space (a reparameterisation of per-projection (alpha, s)). A genome holds
- s_b, one sparsity per decoder block (how the model's byte budget is shared between blocks), and
- w_p, one log error weight per projection,
and decodes to a plan by the block Lagrangian of `plan.solve_block`: inside block b, every
projection takes the (kappa, r, score) minimising exp(w_p) * err_p(kappa, r) + lambda * bytes, with
lambda set so the block reads at most (1 - s_b) of its dense bytes. Any per-projection
(kappa, r) on the lower convex hull of the calibration error tables is reachable by some w, rank 0
(alpha = 1) is always an option, and the 7 x n_blocks x 2 raw (alpha, s) genes shrink to
8 x n_blocks genes that move a plan along the directions that matter. The seed genome
(s_b = s, w = 0) is exactly the default `auto` plan, so the search starts from the best
table-driven allocation and only has to find what the tables cannot see: the end-to-end effect.

Budget. Every candidate meets the model budget by construction: a repair step shifts the free
blocks' s_b by one common offset c (bisection, s_b clipped to [0, S_MAX]) until
sum_b (1 - s_b) D_b = (1 - s) D exactly, and each block's Lagrangian stays within its share.

The lm_head inside the budget (`head_sparsity="auto"`, `Space(head=[out, in])`): the genome gains
h, the head's byte sparsity (seed: s), which behaves as one more block of D_H elements that is free
in every group (the head is scored with every candidate): the budget becomes
sum_b (1 - s_b) D_b + (1 - h) D_H = (1 - s)(D + D_H), and the repair shifts h with the free blocks.
Why a gene and not a table: no error table prices a logit error against a block's output error,
and the best split moved with the budget (docs/results.md, "The lm_head in the budget").

Group-wise, as in the R-Sparse paper: blocks are split into `groups` consecutive groups, searched
first to last. While group g is searched, blocks before it are fixed (their outputs cached by
`Fitness.advance`), mutations touch the genes of group g only, and the repair may move budget to or
from all later blocks. Per group: `population` genomes, `generations` generations, elitist
selection (the best quarter survives), block-wise uniform crossover, Gaussian mutation. Guard
against fitting the fitness windows: a group's best replaces the incumbent only if it also wins
on separate validation windows.

Reproducible and resumable: one numpy Generator seeded by `seed`; after every generation the
whole state (population, fitnesses, generator state, incumbent, log) is written to
DIR/search_state.json atomically, and a rerun with the same DIR and settings continues from there.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import write_json
from .budget import check_range, check_sparsity, check_whole
from .errors import RSparseError
from .families import HEAD
from .plan import block_keys, block_picks, floor_options, head_pick, projection_options

S_MAX = 0.98  # a block keeps at least 2% of its bytes
LEGACY = {"min_keep": 0.0, "fitness": "kl"}  # SearchConfig fields added later: their value in older saved searches
STATE = "search_state.json"
LOG = "search.log"


@dataclass
class SearchConfig:
    population: int = 16
    generations: int = 4  # per group
    groups: int = 5
    fitness_tokens: int = 2048
    val_tokens: int = 2048
    window: int = 512
    seed: int = 0
    budget_minutes: float | None = None  # stop (with the best validated plan) after this much search time
    sigma_s: float = 0.04  # mutation of a block sparsity
    sigma_w: float = 0.5  # mutation of a log error weight
    p_s: float = 0.3  # per-gene mutation probabilities
    p_w: float = 0.15
    # no projection keeps fewer than this fraction of its input channels. At high sparsity the error
    # tables favour starving a few projections (keep ~ 0.02); their thresholds sit in the extreme tail
    # of the calibration scores and keep many more channels on other text, so such plans overshoot
    # the budget and collapse (docs/results.md, 70%). A floor keeps every threshold in the bulk.
    min_keep: float = 0.0
    # what a candidate minimises on the calibration windows: "kl" to the dense model's next-token
    # distributions, or "ce", cross-entropy on the true next tokens (log perplexity, the paper's).
    # Both rank plans like evaluation perplexity (benchmarks/fitness_rank.py); KL needs fewer tokens
    # to separate a plan from its mutant (benchmarks/fitness_cost.py), hence the default.
    fitness: str = "kl"

    def __post_init__(self):
        for name in ("population", "generations", "groups", "fitness_tokens", "val_tokens", "window"):
            setattr(self, name, check_whole(getattr(self, name), f"search {name}"))
        if self.population < 2:
            raise RSparseError(f"search population must be at least 2, got {self.population}")
        self.seed = check_whole(self.seed, "search seed", least=0)
        self.min_keep = check_sparsity(self.min_keep, "search min_keep")
        for name in ("sigma_s", "sigma_w"):
            setattr(self, name, check_range(getattr(self, name), f"search {name}", 0.0, math.inf))
        for name in ("p_s", "p_w"):
            setattr(self, name, check_range(getattr(self, name), f"search {name}", 0.0, 1.0))
        if self.fitness not in ("kl", "ce"):
            raise RSparseError(f"search fitness must be 'kl' or 'ce', got {self.fitness!r}")
        if self.budget_minutes is not None and not check_range(self.budget_minutes, "--budget-minutes", 0.0, math.inf) > 0:
            raise RSparseError(f"--budget-minutes must be positive, got {self.budget_minutes}")

    def identity(self) -> dict:
        """The settings a resumed search must share (the time budget may change between runs)."""
        return {k: v for k, v in asdict(self).items() if k != "budget_minutes"}


class Space:
    """Genomes (s per block, w per projection, and h for a searched lm_head) of one model, budget and option set."""

    def __init__(self, stats, shapes: dict, sparsity: float, scores, rule, min_keep: float = 0.0, head=None):
        self.stats, self.shapes, self.sparsity = stats, shapes, sparsity
        self.keys = list(stats.proj)
        self.by_block = block_keys(self.keys)
        self.blocks = sorted(self.by_block)
        self.dense = np.array([sum(shapes[k][0] * shapes[k][1] for k in self.by_block[b]) for b in self.blocks], dtype=np.float64)
        self.options = {k: floor_options(projection_options(stats.proj[k], shapes[k], scores, rule), min_keep) for k in self.keys}
        self.head = list(head) if head else None  # the lm_head's [out, in] when its share is a gene
        # the budget's elements: the blocks', then the head's (one more always-free entry of the s vector)
        self.budget_dense = np.append(self.dense, float(np.prod(self.head))) if self.head else self.dense

    def seed(self) -> dict:
        return {"s": [self.sparsity] * len(self.blocks), "w": [0.0] * len(self.keys), **({"h": self.sparsity} if self.head else {})}

    def vector(self, genome: dict) -> np.ndarray:
        """The genome's sparsities as one vector over `budget_dense` (the blocks', then h)."""
        return np.array(genome["s"] + ([genome["h"]] if self.head else []), dtype=np.float64)

    def genome(self, v: np.ndarray, w) -> dict:
        n = len(self.blocks)
        return {"s": [float(x) for x in v[:n]], "w": [float(x) for x in w], **({"h": float(v[n])} if self.head else {})}

    def free(self, start: int) -> np.ndarray:
        """1 for the entries a group starting at block `start` may move: its blocks, later ones, the head."""
        return np.array([b >= start for b in self.blocks] + ([True] if self.head else []), dtype=np.float64)

    def repair(self, s: np.ndarray, free: np.ndarray) -> np.ndarray:
        """s (a `vector`) shifted on the free entries by one offset so that the budgets sum to the model's."""
        target = (1.0 - self.sparsity) * self.budget_dense.sum()

        def read(c):
            return float(((1.0 - np.clip(s + c * free, 0.0, S_MAX)) * self.budget_dense).sum())

        if abs(read(0.0) - target) <= 1e-12 * target and np.all((s >= 0) & (s <= S_MAX)):
            return s.copy()
        lo, hi = -1.0, 1.0  # read() decreases in c; read(-1) >= target >= read(1) on feasible inputs
        if read(hi) > target:
            raise RSparseError("the fixed blocks already exceed the model budget")
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if read(mid) <= target else (mid, hi)
        return np.clip(s + hi * free, 0.0, S_MAX)

    def decode(self, genome: dict, blocks=None, head: bool = True) -> dict:
        """(keep, rank, score) for every projection of `blocks` (default: all), and for a searched
        lm_head under HEAD (even at h = 0: a dense head is a choice) unless `head` is False."""
        s = dict(zip(self.blocks, genome["s"]))
        wanted = {b: s[b] for b in (self.blocks if blocks is None else blocks)}
        mult = {k: math.exp(w) for k, w in zip(self.keys, genome["w"])}
        picks = block_picks(self.stats, self.shapes, wanted, None, None, mult=mult, options=self.options)
        if self.head and head:
            picks.update(head_pick(genome["h"]))
        return picks

    def read_elements(self, picks: dict) -> float:
        shapes = {**self.shapes, **({HEAD: self.head} if self.head else {})}
        return sum(keep * shapes[k][0] * shapes[k][1] + r * sum(shapes[k]) for k, (keep, r, _) in picks.items())


def _groups(blocks: list, n: int) -> list:
    n = min(n, len(blocks))
    return [list(map(int, g)) for g in np.array_split(np.array(blocks), n)]


def search_identity(config: SearchConfig, sparsity: float, **extra) -> dict:
    """What a directory's search is: a rerun resumes it only if this is equal."""
    return {"search": config.identity(), "sparsity": sparsity, **extra}


def read_state(directory):
    """The saved search state of `directory`, or None if there is none."""
    path = Path(directory) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RSparseError(f"{path}: corrupt search state ({e}); delete it to start over") from None


def refuse_other(directory, identity: dict, state=None) -> None:
    """Refuse to resume a search whose saved identity differs on any key of `identity` (a partial
    identity lets the CLI refuse before minutes of calibration, when no Search exists yet)."""
    state = read_state(directory) if state is None else state
    saved = state.get("identity") if isinstance(state, dict) else None
    if isinstance(saved, dict) and isinstance(saved.get("search"), dict):
        # settings added after this state was written had, in effect, these values (even if a default changes later)
        saved = dict(saved, search={**LEGACY, **saved["search"]})
    if state is not None and (not isinstance(saved, dict) or any(saved.get(k) != v for k, v in identity.items())):
        raise RSparseError(f"{directory} holds a search with other settings; use another directory or delete {STATE}")


def _picks_key(picks: dict) -> str:
    return hashlib.sha1(json.dumps(sorted(picks.items())).encode()).hexdigest()


class Search:
    """Runs the group-wise search; `evaluate(picks, start_block, split)` scores a candidate whose
    blocks >= start_block follow `picks` (blocks before it follow the incumbent), lower is better;
    `advance(picks, from_block, to_block)` tells the evaluator the incumbent of those blocks is fixed."""

    def __init__(self, space: Space, config: SearchConfig, directory, evaluate, advance=lambda picks, a, b: None,
                 identity: dict | None = None, progress=print):
        self.space, self.cfg, self.dir = space, config, Path(directory)
        self.evaluate, self.advance, self.progress = evaluate, advance, progress
        self.identity = search_identity(config, space.sparsity, **(identity or {}))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.groups = _groups(space.blocks, config.groups)

    # ----- state -----
    def _load(self):
        state = read_state(self.dir)
        if state is not None:
            refuse_other(self.dir, self.identity, state)
        return state

    def _save(self, state):
        write_json(self.dir / STATE, state, indent=None)

    def _log(self, entry: dict, state: dict):
        state["history"].append(entry)
        with open(self.dir / LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.progress(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    # ----- genetic operators -----
    def _mutate(self, rng, g: dict, group: list, free: np.ndarray) -> dict:
        """`free`: the space's `free(group[0])`, the head's entry included where the head is a gene."""
        s, w = self.space.vector(g), np.array(g["w"])
        sidx = [self.space.blocks.index(b) for b in group] + ([len(s) - 1] if self.space.head else [])
        kidx = [i for i, k in enumerate(self.space.keys) if int(k.split(".")[0]) in group]
        changed = False
        while not changed:  # at least one gene moves
            for i in sidx:
                if rng.random() < self.cfg.p_s:
                    s[i] += rng.normal(0.0, self.cfg.sigma_s)
                    changed = True
            for i in kidx:
                if rng.random() < self.cfg.p_w:
                    w[i] += rng.normal(0.0, self.cfg.sigma_w)
                    changed = True
        return self.space.genome(self.space.repair(s, free), w)

    def _crossover(self, rng, a: dict, b: dict, group: list) -> dict:
        s, w = np.array(a["s"]), np.array(a["w"])
        for blk in group:
            if rng.random() < 0.5:
                i = self.space.blocks.index(blk)
                s[i] = b["s"][i]
                for j, k in enumerate(self.space.keys):
                    if int(k.split(".")[0]) == blk:
                        w[j] = b["w"][j]
        child = {"s": s.tolist(), "w": w.tolist()}
        if self.space.head:
            child["h"] = b["h"] if rng.random() < 0.5 else a["h"]
        return child

    def _children(self, rng, ranked: list, group: list, free: np.ndarray) -> list:
        elite = max(1, self.cfg.population // 4)
        pop = [dict(m) for m in ranked[:elite]]  # ranked: sorted by fitness
        parents = ranked[: max(2, self.cfg.population // 2)]
        while len(pop) < self.cfg.population:
            a, b = (parents[i] for i in rng.choice(len(parents), size=2, replace=False))
            child = self._crossover(rng, a["genome"], b["genome"], group)
            pop.append({"genome": self._mutate(rng, child, group, free)})
        return pop

    # ----- main loop -----
    def run(self) -> dict:
        """Returns the final state (its "incumbent" genome is the searched allocation)."""
        state = self._load()
        t_resume = time.time()
        self._fixed = 0  # blocks before this one are cached by the evaluator (not persisted: evaluator state)
        if state is None:
            seed = self.space.seed()
            picks = self.space.decode(seed)
            state = {"identity": self.identity, "group": 0, "generation": -1, "population": None, "seen": {},
                     "incumbent": seed, "incumbent_fit": self.evaluate(picks, 0, "fit"),
                     "incumbent_val": self.evaluate(picks, 0, "val"), "history": [], "seconds": 0.0,
                     "done": False, "evaluations": 2,
                     "rng": np.random.default_rng(self.cfg.seed).bit_generator.state}
            state["seed_fit"], state["seed_val"] = state["incumbent_fit"], state["incumbent_val"]
            self._save(state)
        budget = self.cfg.budget_minutes
        if state["done"] and not (state.get("stopped") and (budget is None or state["seconds"] < 60 * budget)):
            return state
        state.update(done=False, stopped=None)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        seconds0 = state["seconds"]
        for gi in range(state["group"], len(self.groups)):
            group = self.groups[gi]
            start = group[0]
            free = self.space.free(start)
            self._advance_to(state, start)
            if state["population"] is None:  # a new group: the incumbent and its mutants
                gen, inc = 0, state["incumbent"]
                pop = [{"genome": inc, "fit": state["incumbent_fit"]}]
                pop += [{"genome": self._mutate(rng, inc, group, free)} for _ in range(self.cfg.population - 1)]
            else:  # resume after a completed generation
                gen, pop = state["generation"] + 1, state["population"]
                if gen < self.cfg.generations:
                    pop = self._children(rng, pop, group, free)
            while gen < self.cfg.generations:
                for member in pop:
                    if "fit" not in member:
                        picks = self.space.decode(member["genome"], self._free_blocks(start))
                        key = _picks_key(picks)
                        if key not in state["seen"]:  # a genome that decodes to a known plan costs nothing
                            state["seen"][key] = self.evaluate(picks, start, "fit")
                            state["evaluations"] += 1
                        member["fit"] = state["seen"][key]
                pop = sorted(pop, key=lambda m: m["fit"])
                state.update(population=pop, generation=gen, rng=rng.bit_generator.state,
                             seconds=seconds0 + time.time() - t_resume)
                fits = [m["fit"] for m in pop]
                self._log({"group": gi, "blocks": f"{group[0]}-{group[-1]}", "generation": gen, "best": fits[0],
                           "median": float(np.median(fits)), "incumbent": state["incumbent_fit"],
                           "evaluations": state["evaluations"], "seconds": round(state["seconds"], 1)}, state)
                self._save(state)
                if budget is not None and state["seconds"] > 60 * budget:
                    state["stopped"] = "budget"
                    break
                gen += 1
                if gen < self.cfg.generations:
                    pop = self._children(rng, pop, group, free)
            self._close_group(state, gi, start)
            if state.get("stopped"):
                self._log({"stopped": "budget", "after_group": gi, "seconds": round(state["seconds"], 1)}, state)
                break
        state["done"] = True
        state["seconds"] = seconds0 + time.time() - t_resume
        self._save(state)
        return state

    def _free_blocks(self, start: int) -> list:
        return [b for b in self.space.blocks if b >= start]

    def _advance_to(self, state, start: int) -> None:
        """Tell the evaluator that blocks before `start` follow the incumbent."""
        if start > self._fixed:
            picks = self.space.decode(state["incumbent"], [b for b in self.space.blocks if self._fixed <= b < start], head=False)
            self.advance(picks, self._fixed, start)
            self._fixed = start

    def _close_group(self, state, gi: int, start: int) -> None:
        """The group's best becomes the incumbent if it also wins on the validation windows."""
        best = state["population"][0]
        entry = {"group": gi, "validated": False}
        if best["fit"] < state["incumbent_fit"] and best["genome"] != state["incumbent"]:
            val = self.evaluate(self.space.decode(best["genome"], self._free_blocks(start)), start, "val")
            state["evaluations"] += 1
            entry.update(best_fit=best["fit"], best_val=val, incumbent_val=state["incumbent_val"])
            if val < state["incumbent_val"]:
                state.update(incumbent=best["genome"], incumbent_fit=best["fit"], incumbent_val=val)
                entry["validated"] = True
        self._log(entry, state)
        state.update(group=gi + 1, generation=-1, population=None, seen={})
        self._save(state)
