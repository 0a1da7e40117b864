"""Session 30: the sparsity drift of a plan on the sparsified model, and thresholds refined on its own
activations (`rsparse.refine`). Usage: PYTHONPATH=src:benchmarks python benchmarks/refine_drift.py 0.7 16384
(sparsities, refinement tokens); prints realised sparsity on calibration and evaluation windows and
Wikipedia perplexity (24 windows) per sparsity."""
import sys
import time
import rsparse
from rsparse import data, evaluate
from rsparse.apply import measure_sparsity
from rsparse.pipeline import calibration_windows
from rsparse.plan import RSparseConfig, build_plan
from rsparse.refine import refine_thresholds_
from quality import cached_stats

model, tok = rsparse.load()
stats = cached_stats(model, tok, 65536, {})
ev = data.token_windows(tok, "wiki", "eval", 1024, n=24)
cal = calibration_windows(tok, "wiki", int(sys.argv[2]), 1024, 0)
for s in map(float, sys.argv[1].split(",")):
    m, _ = rsparse.load()
    plan = build_plan(m, stats, RSparseConfig(sparsity=s))
    rsparse.sparsify_(m, plan)
    t = time.time()
    p2 = refine_thresholds_(m, plan, cal)
    dt = time.time() - t
    r_cal = measure_sparsity(m, cal[:4], plan.shapes)["sparsity"]
    r_ev = measure_sparsity(m, ev[:4], plan.shapes)["sparsity"]
    ppl = evaluate.perplexity(m, ev)["ppl"]
    print(f"target {s}: refine {dt:.0f}s realised calib {r_cal:.4f} eval {r_ev:.4f} ppl wiki {ppl:.2f}", flush=True)
