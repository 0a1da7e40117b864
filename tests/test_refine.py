"""Thresholds refined on the sparsified model's own activations: each module then keeps its planned
fraction on the refinement windows, counted directly with the modules' own keep rule; `calibrate`
refines by default and leaves the model dense."""
import json

import pytest
import torch

from rsparse import artifact, save_plan
from rsparse.apply import measure_sparsity, sparse_modules, sparsify_
from rsparse.errors import RSparseError
from rsparse.pipeline import calibrate, calibration_windows, refine
from rsparse.plan import RSparseConfig, build_plan
from rsparse.refine import refine_thresholds_


def test_refined_thresholds_keep_the_planned_fractions(smol, smol_plan50):
    model, tok = smol()
    plan = smol_plan50()
    for lp in plan.layers.values():  # a plan whose thresholds are off: every one halved
        lp.tau = lp.tau * 0.5
    sparsify_(model, plan)
    torch.manual_seed(0)
    windows = torch.randint(100, 20000, (2, 96))
    refined = refine_thresholds_(model, plan, windows)
    got = measure_sparsity(model, windows, plan.shapes)["keep"]
    for k, lp in refined.layers.items():
        assert abs(got[k] - lp.keep) < 0.03, (k, got[k], lp.keep)
        assert lp.keep in (0.0, 1.0) or lp.tau != plan.layers[k].tau
    assert refined.calibration["refined"] == {"tokens": 192, "windows": [2, 96]}


def test_calibrate_refines_on_calibration_text_and_leaves_the_model_dense(smol, smol_stats):
    """At 70% the dense-activation thresholds keep fewer channels than planned once earlier blocks are
    sparse; the refined plan, applied to a fresh model, keeps the planned fractions on its refinement
    text (the first calibration window, 512 tokens), and the model given to `calibrate` stays dense."""
    model, tok = smol()
    cfg = RSparseConfig(method="teal", sparsity=0.7, allocation="uniform")  # rank 0: no SVDs
    raw = calibrate(model, tok, cfg, stats=smol_stats, refine_tokens=0)
    assert "refined" not in raw.calibration
    assert {k: lp.tau for k, lp in raw.layers.items()} == {k: lp.tau for k, lp in build_plan(model, smol_stats, cfg).layers.items()}
    length = smol_stats.config["windows"][1]
    plan = calibrate(model, tok, cfg, stats=smol_stats, refine_tokens=length)
    assert not sparse_modules(model) and plan.calibration["refined"]["tokens"] == length
    window = calibration_windows(tok, "wiki", length, length, 0)
    realised = {}
    for p in (raw, plan):
        m, _ = smol()
        sparsify_(m, p)
        realised[id(p)] = measure_sparsity(m, window, p.shapes)["sparsity"]
    assert realised[id(raw)] > 0.71, realised  # the drift refinement exists for
    assert abs(realised[id(plan)] - plan.expected_sparsity()) < 0.005, (realised, plan.expected_sparsity())


def test_refine_defaults_and_bad_input(smol, smol_stats):
    model, tok = smol()
    cats = calibrate(model, tok, RSparseConfig(method="cats", sparsity=0.5), stats=smol_stats)
    assert "refined" not in cats.calibration  # no projection thresholds to refine
    teal = build_plan(model, smol_stats, RSparseConfig(method="teal", sparsity=0.5, allocation="uniform"))
    with pytest.raises(RSparseError, match="must be a whole number >= 0"):
        refine(model, tok, teal, -1, smol_stats)
    sparsify_(model, teal)
    with pytest.raises(RSparseError, match="already sparsified"):
        refine(model, tok, teal, 1024, smol_stats)


def test_the_same_model_and_text_give_the_same_plan_bit_for_bit(tiny_llama, tmp_path):
    """observe -> decide -> refine twice on the same model and text: the same plan JSON and the
    same factor bits (a user's rerun of `rsparse calibrate` on one machine reproduces the plan; across
    machines, float reductions may differ: docs/results.md). Control: a different text changes it.
    The model is built as transformers builds one, weights requiring grad: the plan still saves and loads."""
    from rsparse.calibrate import collect

    torch.manual_seed(1)
    text, other_text = torch.randint(0, 50, (4, 32)), torch.randint(0, 50, (4, 32))

    def plan_from(windows):
        torch.manual_seed(0)  # the same random model each time
        model = tiny_llama()
        stats = collect(model, windows, sample_tokens=64, progress=False)
        plan = build_plan(model, stats, RSparseConfig(sparsity=0.5, allocation="uniform", alpha=0.9))  # ranked
        sparsify_(model, plan)
        return refine_thresholds_(model, plan, windows[:2])

    a, b = plan_from(text), plan_from(text.clone())
    assert a.to_json() == b.to_json()
    assert a.factors and a.factors.keys() == b.factors.keys()
    assert all(torch.equal(u, b.factors[k][0]) and torch.equal(v, b.factors[k][1]) for k, (u, v) in a.factors.items())
    other = plan_from(other_text)
    assert other.to_json() != a.to_json()
    save_plan(a, tmp_path / "plan")
    back = artifact.load(tmp_path / "plan")
    assert json.loads(json.dumps(back.to_json())) == json.loads(json.dumps(a.to_json()))
    assert all(torch.equal(back.factors[k][0], u) for k, (u, _) in a.factors.items())
