"""Thresholds refined on the sparsified model's own activations: each module then keeps its planned
fraction on the refinement windows, counted directly with the modules' own keep rule."""
import torch

from rsparse.apply import measure_sparsity, sparsify_
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
    assert refined.calibration["refined"]["passes"] == 4
