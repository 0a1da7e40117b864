"""Calibration statistics: histogram quantiles, error tables, thresholds on a real model."""
import math

import pytest
import torch

from rsparse import data
from rsparse.calibrate import KEEPS, Histogram, error_table, spectrum
from rsparse.linear import svd_factors


def test_histogram_quantiles_match_sorting():
    x = torch.randn(200_000).abs() * torch.rand(200_000) * 7
    h = Histogram()
    h.add(x[:100_000])
    h.add(x[100_000:])
    for q in (0.05, 0.3, 0.5, 0.77, 0.99):
        tau = h.quantile(q)
        assert abs((x <= tau).double().mean().item() - q) < 2e-3
        assert abs(h.fraction_above(tau) - (1 - q)) < 1e-2
    assert h.quantile(0.0) == -math.inf and h.quantile(1.0) == math.inf


def test_error_table_matches_brute_force():
    torch.manual_seed(0)
    W = torch.randn(20, 12, dtype=torch.float64)
    X = torch.randn(300, 12, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    h = Histogram()
    h.add(X.abs())
    ranks = (0, 1, 3, 12)
    tab = error_table(W, X, h, torch.ones(12), ranks)
    total = (X @ W.T).pow(2).sum()
    for a, keep in enumerate(KEEPS):
        tau = h.quantile(1 - keep) if keep < 1 else -math.inf
        Z = torch.where(X.abs() > tau, 0.0, X)
        for ri, r in enumerate(ranks):
            U, A = svd_factors(W, r)
            brute = ((Z @ (W - U @ A).T).pow(2).sum() / total).item()
            assert abs(tab[a, ri].item() - brute) < 1e-5 + 1e-4 * brute
    # rank 0 alone needs no SVD and gives the same column; a given spectrum gives the same table
    assert torch.allclose(error_table(W, X, h, torch.ones(12), (0,))[:, 0], tab[:, 0], rtol=1e-5, atol=1e-7)
    assert torch.equal(error_table(W, X, h, torch.ones(12), ranks, spectrum(W)), tab)


def test_rank_zero_statistics_serve_teal_and_refuse_rsparse(tiny_llama):
    """collect(ranks=(0,)) (what greedy TEAL calibrations and TEAL searches collect): the same rank-0
    errors as a full collection, no rank columns, and an rsparse allocation that would choose ranks
    from them is refused instead of silently choosing rank 0 everywhere. collect(scores=()) (CATS,
    uniform TEAL, uniform R-Sparse at a given alpha): no tables, and those plans come out the same."""
    from rsparse.calibrate import collect
    from rsparse.errors import RSparseError
    from rsparse.pipeline import collection_for
    from rsparse.plan import RSparseConfig, build_plan

    torch.manual_seed(0)
    model = tiny_llama()
    windows = torch.randint(0, 50, (4, 32))
    full = collect(model, windows, sample_tokens=64, progress=False)
    zero = collect(model, windows, sample_tokens=64, progress=False, ranks=(0,))
    assert zero.config["ranks"] == [0] and full.config["ranks"][0] == 0 and len(full.config["ranks"]) > 1
    for key, st in zero.proj.items():
        assert st.ranks == (0,) and st.err["abs"].shape == (len(KEEPS), 1)
        assert torch.allclose(st.err["wnorm"][:, 0], full.proj[key].err["wnorm"][:, 0], rtol=1e-4, atol=1e-6)
    teal = build_plan(model, zero, RSparseConfig(method="teal", sparsity=0.5, allocation="greedy"))
    assert abs(teal.expected_sparsity() - 0.5) < 0.02
    for cfg in (RSparseConfig(sparsity=0.5), RSparseConfig(sparsity=0.5, allocation="uniform", alpha=None)):
        with pytest.raises(RSparseError, match="rank 0 only"):
            build_plan(model, zero, cfg)
    # CATS's collection (what pipeline.calibrate asks for it): no error tables; its plan reads the
    # activation histograms alone
    bare = collect(model, windows, sample_tokens=64, progress=False, scores=(), ranks=(0,))
    assert all(not st.err and st.weight == 1.0 for st in bare.proj.values())  # no tables, no sensitivities
    cats = build_plan(model, bare, RSparseConfig(method="cats", sparsity=0.5))
    assert sorted(cats.layers) == ["0.act", "1.act"]
    # the plans that read the histograms alone come out of it exactly as from the full collection
    for cfg in (RSparseConfig(method="teal", sparsity=0.4), RSparseConfig(sparsity=0.6, allocation="uniform", alpha=0.9)):
        assert collection_for(cfg) == {"scores": (), "ranks": (0,)}
        assert build_plan(model, bare, cfg).layers == build_plan(model, full, cfg).layers
    for cfg in (RSparseConfig(method="teal", sparsity=0.5, allocation="greedy"), RSparseConfig(sparsity=0.5),
                RSparseConfig(sparsity=0.5, allocation="uniform")):  # these read the tables: refused by name
        assert collection_for(cfg)["scores"]
        with pytest.raises(RSparseError, match="lack error tables for score 'abs'"):
            build_plan(model, bare, cfg)
    assert collection_for(RSparseConfig(method="teal", sparsity=0.4), search=True) == {"scores": ("abs",), "ranks": (0,)}
    with pytest.raises(ValueError, match="must include 0"):
        collect(model, windows, progress=False, ranks=(4, 8))


def _held_back_kept(model, tok, stats, keys, sparsities, n=4, tol=0.02):
    """Kept fraction on windows the calibration did not see, for thresholds from `stats`."""
    from rsparse.families import locate

    held = data.token_windows(tok, "wiki", "calib", 1024, n=n, seed=123)
    projs = locate(model)
    seen = {k: [] for k in keys}
    hooks = [projs[k].register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].detach().abs())) for k in keys]
    with torch.inference_mode():
        for w in held:
            model(w[None])
    for h in hooks:
        h.remove()
    for k in keys:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[k]])
        for s in sparsities:
            tau = stats.proj[k].hist["abs"].quantile(s)
            kept = (x > tau).double().mean().item()
            assert abs(kept - (1 - s)) <= tol, (k, s, kept)


def test_thresholds_hit_target_on_held_back_tokens(smol, smol_stats):
    """Fast check on 2k calibration tokens and 2k held-back ones (looser: +-3 points)."""
    model, tok = smol()
    _held_back_kept(model, tok, smol_stats, ["0.q", "7.gate", "15.down", "29.o", "11.k"], (0.4, 0.5, 0.7), n=2, tol=0.03)


@pytest.mark.slow
def test_default_calibration_hits_target_within_2_points(smol):
    """The default 64k calibration tokens: every projection within +-2 points on held-back text."""
    from rsparse.calibrate import collect
    from rsparse.pipeline import calibration_windows

    model, tok = smol()
    stats = collect(model, calibration_windows(tok), sample_tokens=64, scores=(), progress=False)
    keys = [f"{b}.{p}" for b in (0, 9, 19, 29) for p in ("q", "k", "o", "gate", "down")]
    _held_back_kept(model, tok, stats, keys, (0.4, 0.5, 0.6, 0.7), n=8)


def test_sensitivity_weights_are_positive_and_finite(smol_stats):
    w = [st.weight for st in smol_stats.proj.values()]
    assert len(w) == 30 * 7 and all(0 < x < math.inf for x in w)
