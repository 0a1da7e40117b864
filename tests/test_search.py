"""The evolutionary allocation search: budget, determinism, resume, and a real run on the bundled model."""
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsparse.calibrate import KEEPS, RANKS, ProjStats, Stats
from rsparse.errors import RSparseError
from rsparse.families import HEAD, PROJECTIONS
from rsparse.plan import RSparseConfig
from rsparse.search import S_MAX, Search, SearchConfig, Space, refuse_other, search_identity


def synthetic_stats(rng, n_blocks, hidden, inter, kv):
    """Stats with monotone random error tables for Llama-like shapes (no model needed)."""
    shapes, proj = {}, {}
    dims = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    keeps = torch.tensor(KEEPS, dtype=torch.float64)
    for b in range(n_blocks):
        for p in PROJECTIONS:
            key, shape = f"{b}.{p}", dims[p]
            ranks = tuple(r for r in RANKS if r <= min(shape))
            rho = float(rng.uniform(2, 60))
            r = torch.tensor(ranks, dtype=torch.float64)
            err = (1 - keeps[:, None]) ** float(rng.uniform(1.2, 3)) * torch.exp(-r[None] / rho)
            proj[key] = ProjStats(shape=shape, err={"abs": err.float()}, ranks=ranks, weight=float(rng.uniform(0.2, 5)))
            shapes[key] = list(shape)
    return Stats(proj=proj, act={}, tokens=0, config={}), shapes


def truth(space, rng):
    """A hidden fitness: the tables re-weighted by factors the statistics do not know."""
    hidden = {k: float(w) for k, w in zip(space.keys, rng.uniform(0.1, 10, len(space.keys)))}

    def f(picks):
        tot = 0.0
        for k, (keep, rank, _) in picks.items():
            st_ = space.stats.proj[k]
            tab = st_.err["abs"].double().numpy()
            ri = st_.ranks.index(rank) if rank in st_.ranks else 0
            tot += hidden[k] * float(np.interp(keep, KEEPS, tab[:, ri]))
        return tot

    return f


def make(tmp_path, seed=0, n_blocks=6, sparsity=0.5, cfg=None, name="run", shapes=(64, 160, 16)):
    rng = np.random.default_rng(123)
    stats, shp = synthetic_stats(rng, n_blocks, *shapes)
    space = Space(stats, shp, sparsity, ("abs",), None)
    f = truth(space, rng)
    fixed = {}

    def evaluate(picks, start, split):  # blocks < start follow the incumbent handed over by advance()
        full = {**{k: v for k, v in fixed.items() if int(k.split(".")[0]) < start}, **picks}
        assert len(full) == len(space.keys)
        return f(full) * (1.0 if split == "fit" else 1.01)

    def advance(picks, a, b):
        fixed.update(picks)

    cfg = cfg or SearchConfig(population=6, generations=3, groups=3, seed=seed)
    return space, Search(space, cfg, tmp_path / name, evaluate, advance, progress=lambda *_: None), f


def test_search_improves_on_seed_and_keeps_the_budget(tmp_path):
    space, search, f = make(tmp_path)
    decoded = []
    orig = space.decode

    def spy(genome, blocks=None, **kw):
        decoded.append(json.dumps(genome))
        return orig(genome, blocks, **kw)

    space.decode = spy
    state = search.run()
    budget = (1 - space.sparsity) * space.dense.sum()
    assert len(set(decoded)) > 20
    for g in set(decoded):  # every candidate the search produced, whole-model budget
        read = space.read_elements(orig(json.loads(g)))
        assert read <= budget * (1 + 1e-9)
        assert read >= budget * 0.99  # no budget left on the table
        assert all(0 <= s <= S_MAX for s in json.loads(g)["s"])
    seed_fit = f(orig(space.seed()))
    assert state["seed_fit"] == pytest.approx(seed_fit)
    assert state["incumbent_fit"] < 0.97 * seed_fit  # the hidden weights are learnable
    assert (tmp_path / "run" / "search.log").read_text().count("\n") == len(state["history"])


def test_same_seed_same_plan_other_seed_other_path(tmp_path):
    a = make(tmp_path, name="a")[1].run()
    b = make(tmp_path, name="b")[1].run()
    c = make(tmp_path, seed=7, name="c", cfg=SearchConfig(population=6, generations=3, groups=3, seed=7))[1].run()
    assert a["incumbent"] == b["incumbent"] and a["history"] == [dict(h, seconds=a["history"][i].get("seconds")) if "seconds" in h else h for i, h in enumerate(b["history"])]
    assert c["incumbent"] != a["incumbent"]


@pytest.mark.parametrize("stop_after", [3, 11, 25])
def test_resume_after_interrupt_gives_the_same_plan(tmp_path, stop_after):
    ref = make(tmp_path, name="ref")[1].run()
    space, search, f = make(tmp_path, name="cut")
    calls = {"n": 0}
    inner = search.evaluate

    def flaky(picks, start, split):
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise KeyboardInterrupt
        return inner(picks, start, split)

    search.evaluate = flaky
    with pytest.raises(KeyboardInterrupt):
        search.run()
    state_file = tmp_path / "cut" / "search_state.json"
    json.loads(state_file.read_text())  # never half-written
    resumed = make(tmp_path, name="cut")[1].run()  # a fresh process: new evaluator, state from disk
    assert resumed["incumbent"] == ref["incumbent"]
    assert resumed["incumbent_fit"] == ref["incumbent_fit"]


def test_resume_refuses_other_settings(tmp_path):
    make(tmp_path, name="x")[1].run()
    with pytest.raises(RSparseError, match="other settings"):
        make(tmp_path, name="x", cfg=SearchConfig(population=5, generations=3, groups=3))[1].run()
    (tmp_path / "x" / "search_state.json").write_text("{not json")
    with pytest.raises(RSparseError, match="corrupt search state"):
        make(tmp_path, name="x")[1].run()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_blocks=st.integers(1, 5), hidden=st.integers(8, 96), ratio=st.integers(1, 4),
       groups=st.integers(1, 4), s=st.floats(0.05, 0.95), vocab=st.sampled_from([0, 7, 301]))
def test_budget_property_random_shapes(seed, n_blocks, hidden, ratio, groups, s, vocab):
    """Random shapes (GQA-like k/v, odd sizes), sparsities, mutation streams and (vocab > 0) a searched
    lm_head of [vocab, hidden]: every genome the operators produce decodes to a plan that meets the
    budget, the head's bytes included."""
    rng = np.random.default_rng(seed)
    stats, shp = synthetic_stats(rng, n_blocks, hidden, hidden * ratio + 3, max(1, hidden // ratio))
    space = Space(stats, shp, s, ("abs",), None, head=[vocab, hidden] if vocab else None)
    search = Search(space, SearchConfig(population=4, groups=groups, seed=seed), "/tmp/unused-search", lambda *a: 0.0)
    H = vocab * hidden
    budget = (1 - s) * (space.dense.sum() + H)
    g = space.seed()
    for _ in range(12):
        group = search.groups[int(rng.integers(len(search.groups)))]
        other = search._mutate(rng, g, group, space.free(group[0]))
        g = search._mutate(rng, search._crossover(rng, g, other, group), group, space.free(group[0]))
        picks = space.decode(g)
        assert (HEAD in picks) == bool(vocab)
        read = space.read_elements(picks)
        assert read <= budget * (1 + 1e-9) + 1e-6
        h = g["h"] if vocab else 0.0
        assert 0 <= h <= S_MAX
        assert math.isclose(float(((1 - np.array(g["s"])) * space.dense).sum()) + (1 - h) * H, budget, rel_tol=1e-9)


@pytest.mark.parametrize("head_cost,side", [(50.0, -1), (1e-3, +1)])
def test_searched_head_share_follows_its_cost_under_the_total_budget(tmp_path, head_cost, side):
    """head_sparsity='auto': the genome's h starts at the budget's s and every candidate reads exactly
    the total budget (blocks + head). With a hidden fitness in which a sparse head is dear (or cheap),
    the found plan moves bytes into (out of) the head, and evaluation always sees the head's pick while
    the blocks handed to `advance` never carry it."""
    rng = np.random.default_rng(5)
    stats, shp = synthetic_stats(rng, 6, 64, 160, 16)
    head = [500, 64]
    space = Space(stats, shp, 0.5, ("abs",), None, head=head)
    f = truth(space, rng)
    budget = 0.5 * (space.dense.sum() + 500 * 64)
    fixed, seen_h = {}, set()

    def evaluate(picks, start, split):
        keep, rank, score = picks[HEAD]
        assert rank == 0 and score == "wnorm"
        assert space.read_elements({**{k: v for k, v in fixed.items() if int(k.split(".")[0]) < start}, **picks}) \
            == pytest.approx(budget, rel=0.01, abs=0)
        seen_h.add(round(1 - keep, 9))
        blocks = {k: v for k, v in picks.items() if k != HEAD}
        return f({**{k: v for k, v in fixed.items() if int(k.split(".")[0]) < start}, **blocks}) + head_cost * (1 - keep) ** 2

    def advance(picks, a, b):
        assert HEAD not in picks
        fixed.update(picks)

    seed = space.seed()
    assert seed["h"] == 0.5 and space.decode(seed)[HEAD] == (0.5, 0, "wnorm")
    cfg = SearchConfig(population=8, generations=4, groups=2, seed=1, p_s=0.5, sigma_s=0.08)
    state = Search(space, cfg, tmp_path / "h", evaluate, advance, progress=lambda *_: None).run()
    assert len(seen_h) > 5
    assert state["incumbent_fit"] < state["seed_fit"]
    assert side * (state["incumbent"]["h"] - 0.5) > 0.05  # side -1: a dear head ends denser; +1: sparser


def test_rank_rule_bounds_every_genome(tmp_path):
    """A search under `--target gpu`'s rule: every genome the operators produce decodes to ranks in
    multiples of 16, each block's charged cost (factor bytes x3) within its share, so the bytes read
    stay under the model budget; the rule's price makes the seed's ranks no larger than the free rule's."""
    from rsparse.budget import RankRule

    rng = np.random.default_rng(5)
    stats, shp = synthetic_stats(rng, 6, 256, 704, 64)
    rule = RankRule(multiple=16, cost=3.0)
    space, free = Space(stats, shp, 0.5, ("abs",), rule), Space(stats, shp, 0.5, ("abs",), None)
    search = Search(space, SearchConfig(population=4, groups=2, seed=1), tmp_path / "s", lambda *a: 0.0)
    g = space.seed()
    for _ in range(10):
        group = search.groups[int(rng.integers(len(search.groups)))]
        mask = np.array([b >= group[0] for b in space.blocks], dtype=np.float64)
        g = search._mutate(rng, search._crossover(rng, g, search._mutate(rng, g, group, mask), group), group, mask)
        picks = space.decode(g)
        assert all(r % 16 == 0 for _, r, _ in picks.values())
        for b, s_b in zip(space.blocks, g["s"]):
            keys = [k for k in space.keys if int(k.split(".")[0]) == b]
            charged = sum(picks[k][0] * shp[k][0] * shp[k][1] + 3.0 * picks[k][1] * sum(shp[k]) for k in keys)
            assert charged <= (1 - s_b) * sum(shp[k][0] * shp[k][1] for k in keys) * (1 + 1e-9) + 1e-6
        assert space.read_elements(picks) <= 0.5 * space.dense.sum() * (1 + 1e-9)
    seed_ranks = [sum(r * sum(shp[k]) for k, (_, r, _) in sp.decode(sp.seed()).items()) for sp in (space, free)]
    assert seed_ranks[0] <= seed_ranks[1] and seed_ranks[1] > 0


def test_search_config_rejects_bad_values():
    with pytest.raises(RSparseError, match="population"):
        SearchConfig(population=1)
    with pytest.raises(RSparseError, match="budget-minutes"):
        SearchConfig(budget_minutes=0)
    with pytest.raises(RSparseError, match="fitness must be"):
        SearchConfig(fitness="ppl")
    for kw, match in [({"population": "8"}, "search population must be a whole number"), ({"groups": 2.5}, "search groups"),
                      ({"generations": None}, "search generations"), ({"seed": -1}, "search seed"),
                      ({"min_keep": "0.1"}, "search min_keep must be a number"), ({"p_s": 1.5}, r"search p_s must be .* \[0, 1\]"),
                      ({"sigma_w": float("nan")}, "search sigma_w"), ({"budget_minutes": "5"}, "budget-minutes must be a number")]:
        with pytest.raises(RSparseError, match=match):
            SearchConfig(**kw)


def test_configs_store_plain_json_types():
    """numpy scalars (what a sweep over np.arange hands in) are stored as int / float, so the plan's
    and the search state's JSON can be written."""
    cfg = RSparseConfig(sparsity=np.float32(0.5), rank_multiple=np.int64(16), rank_cost=np.int64(3), min_keep=np.float64(0.1))
    scfg = SearchConfig(population=np.int64(4), seed=np.int32(3), p_s=np.float32(0.25))
    for c in (cfg, scfg):
        back = json.loads(json.dumps(asdict(c)))
        assert back == asdict(c)
    assert (type(cfg.rank_multiple), type(cfg.rank_cost), type(scfg.population), type(scfg.seed)) == (int, float, int, int)


def test_partial_identity_refused_before_any_work(tmp_path):
    """The CLI checks a directory's search before calibrating, from the settings it knows then."""
    make(tmp_path, name="x")[1].run()
    cfg = SearchConfig(population=6, generations=3, groups=3, seed=0)
    refuse_other(tmp_path / "x", search_identity(cfg, 0.5))  # the same search: resumable
    refuse_other(tmp_path / "none", search_identity(cfg, 0.6))  # no state: nothing to refuse
    for other in (search_identity(cfg, 0.6), search_identity(SearchConfig(population=6, generations=3, groups=3, fitness="ce"), 0.5),
                  search_identity(cfg, 0.5, method="teal")):
        with pytest.raises(RSparseError, match="other settings"):
            refuse_other(tmp_path / "x", other)
    # a state saved before a setting existed resumes when that setting is at its default, not otherwise
    import json as _json
    path = tmp_path / "x" / "search_state.json"
    state = _json.loads(path.read_text())
    for k in ("min_keep", "fitness"):
        del state["identity"]["search"][k]
    path.write_text(_json.dumps(state))
    refuse_other(tmp_path / "x", search_identity(cfg, 0.5))
    with pytest.raises(RSparseError, match="other settings"):
        refuse_other(tmp_path / "x", search_identity(SearchConfig(population=6, generations=3, groups=3, min_keep=0.1), 0.5))


@pytest.mark.slow  # ~90 s; the search's steps, head gene and fitness run in the fast set on small models above
def test_search_plan_on_the_bundled_model(smol, smol_stats, tmp_path):
    """A tiny real search with the lm_head's share as a gene (head_sparsity='auto'; without it the path
    is the same minus the gene): the artifact loads, meets the whole-model budget, and the KL the cached
    block-wise evaluator recorded equals the KL of a plain forward pass of the sparsified model."""
    import torch.nn.functional as F

    from rsparse import artifact
    from rsparse.apply import sparsify_
    from rsparse.pipeline import search_plan, search_windows
    from rsparse.plan import RSparseConfig
    from rsparse.plotting import plan_grid, plot_plan

    model, tok = smol()
    cfg = SearchConfig(population=3, generations=1, groups=2, fitness_tokens=128, val_tokens=128, window=64, seed=3)
    plan = search_plan(model, tok, RSparseConfig(sparsity=0.5, head_sparsity="auto"), cfg, tmp_path / "p", stats=smol_stats,
                       baselines=False, progress=None)
    info = plan.calibration["search"]
    assert info["fitness"] == "kl" and info["fit"] <= info["seed_fit"] and info["val"] <= info["seed_val"]
    loaded = artifact.load(tmp_path / "p")
    assert loaded.config["allocation"] == "evo" and loaded.config["head_sparsity"] == "auto"
    state = json.loads((tmp_path / "p" / "search_state.json").read_text())
    h = state["incumbent"]["h"]
    assert h == pytest.approx(1 - loaded.layers[HEAD].keep) and loaded.layers[HEAD].rank == 0
    assert 0.5 - 1e-9 <= loaded.expected_total_sparsity() <= 0.505

    w = search_windows(tok, smol_stats, cfg)["fit"]
    sparse, _ = smol()
    sparsify_(sparse, loaded)
    with torch.inference_mode():
        ref = F.log_softmax(model(w).logits.double(), -1)
        got = F.log_softmax(sparse(w).logits.double(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert kl == pytest.approx(info["fit"], rel=2e-3)

    s, a = plan_grid(loaded)
    assert s.shape == (7, 30) and ((a >= 0) & (a <= 1)).all() and (s >= 0).all()
    assert plot_plan(loaded, tmp_path / "heat.png").stat().st_size > 1000


@pytest.mark.parametrize("sparsity,min_keep", [(0.7, 0.1), (0.5, 0.2)])
def test_min_keep_floor_holds_for_every_candidate(sparsity, min_keep):
    """With a keep floor, the seed and mutated genomes decode to plans that keep at least min_keep of
    every projection and still meet the budget; without it the tables starve some projection."""
    rng = np.random.default_rng(7)
    stats, shp = synthetic_stats(rng, 4, 64, 160, 16)
    free = Space(stats, shp, sparsity, ("abs",), None)
    floored = Space(stats, shp, sparsity, ("abs",), None, min_keep=min_keep)
    assert min(k for k, _, _ in free.decode(free.seed()).values()) < min_keep
    target = (1 - sparsity) * sum(a * b for a, b in shp.values())
    for _ in range(20):
        g = {"s": list(np.clip(sparsity + rng.normal(0, 0.05, 4), 0, S_MAX)), "w": list(rng.normal(0, 1, len(floored.keys)))}
        g["s"] = floored.repair(np.array(g["s"]), np.ones(4)).tolist()
        picks = floored.decode(g)
        assert min(k for k, _, _ in picks.values()) >= min_keep - 1e-9
        assert floored.read_elements(picks) <= target * (1 + 1e-9)
    with pytest.raises(RSparseError, match="min_keep"):
        SearchConfig(min_keep=1.0)


def test_fitness_kl_and_ce_equal_a_plain_forward_pass(smol, smol_stats):
    """Fitness (cached block inputs, hidden states advanced past fixed blocks) gives the KL to the dense
    model and the cross-entropy that a plain float64 evaluation of the swapped model's logits gives."""
    import torch.nn.functional as F

    from rsparse.apply import modules_for, swapped
    from rsparse.fitness import Fitness
    from rsparse.pipeline import search_windows
    from rsparse.plan import RSparseConfig, config_picks, layers_from_picks, shapes_of

    model, tok = smol()
    w = search_windows(tok, smol_stats, SearchConfig(fitness_tokens=128, val_tokens=128, window=64))["fit"]
    picks, _ = config_picks(smol_stats, shapes_of(model), RSparseConfig(method="teal", allocation="uniform", sparsity=0.6))
    mods = modules_for(model, layers_from_picks(smol_stats, picks), {})
    fit = Fitness(model, {"fit": w}, batch=1)
    with torch.inference_mode():
        ref = F.log_softmax(model(w).logits.double(), -1)
        with swapped(model, mods):
            got = F.log_softmax(model(w).logits.double(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    ce = -got[:, :-1].gather(-1, w[:, 1:, None]).mean().item()
    r = fit(mods, per_token=True)
    assert r["kl"] == pytest.approx(kl, rel=2e-3) and r["ce"] == pytest.approx(ce, rel=1e-4)
    tok_kl = (ref.exp() * (ref - got)).sum(-1)  # each token's term, as the cost estimate uses them
    tok_ce = -got[:, :-1].gather(-1, w[:, 1:, None])[..., 0]
    assert r["kl_tokens"].shape == tok_kl.shape and r["ce_tokens"].shape == tok_ce.shape
    assert torch.allclose(r["ce_tokens"], tok_ce, rtol=1e-3, atol=1e-4)
    assert (r["kl_tokens"] - tok_kl).abs().max().item() < 2e-3 * max(tok_kl.abs().max().item(), 1.0)
    early = {k: m for k, m in mods.items() if int(k.split(".")[0]) < 10}
    fit.advance(early, 10)  # blocks 0-9 fixed: the rest is run from cached hidden states
    r2 = fit({k: m for k, m in mods.items() if int(k.split(".")[0]) >= 10})
    assert r2["kl"] == pytest.approx(kl, rel=2e-3) and r2["ce"] == pytest.approx(ce, rel=1e-4)
