"""Would leaving some projections dense, and the others sparser, keep the quality at the same bytes?

On the GPU our 50% gathers on the attention shapes (latency-bound) are no faster than inductor's
dense GEMV (docs/perf-gpu.md, session 18), so a plan that reads those projections whole and spends
the saved budget elsewhere would decode faster at the same model-level byte sparsity, if its
quality held. Checked first on the bundled model: rank-0 (TEAL-style |x|) plans at the target
sparsity, uniform and block-wise greedy, each with and without the listed projections forced dense
(the others then carry the whole budget: uniform at s * all / (all - forced), greedy solved under the
same block budgets with one option, kept whole, for the forced ones). Perplexity, every token sparse,
on Wikipedia evaluation windows. Prints a table and one JSON line; --out writes the JSON.

    python3 benchmarks/dense_attention_quality.py --dense o [--out benchmarks/results/x.json]
"""
import argparse
import copy
import json

import numpy as np

from rsparse import data
from rsparse.apply import sparsify_
from rsparse.atomic import write_json
from rsparse.budget import RankRule
from rsparse.evaluate import perplexity
from rsparse.models import load
from rsparse.pipeline import observe
from rsparse.plan import (RSparseConfig, block_keys, block_picks, build_plan, config_picks, projection_options,
                          shapes_of)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dense", default="q,k,v,o", help="projection names kept dense (comma list)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--windows", type=int, default=6, help="1024-token evaluation windows")
    ap.add_argument("--out")
    args = ap.parse_args()
    forced = set(args.dense.split(","))
    s = args.sparsity

    model, tok = load("smollm2-135m")
    stats = observe(model, tok, tokens=args.calib_tokens, scores=("abs",), ranks=(0,), progress=False)
    shapes = shapes_of(model)
    is_forced = {k: k.split(".")[1] in forced for k in shapes}
    if not any(is_forced.values()):
        raise SystemExit(f"--dense {args.dense!r} names no projection of this model")
    total = sum(o * i for o, i in shapes.values())
    s_rest = s * total / (total - sum(o * i for k, (o, i) in shapes.items() if is_forced[k]))
    if s_rest >= 1:
        raise SystemExit(f"the other projections cannot carry sparsity {s} alone ({s_rest:.2f} needed)")

    opts = {k: (np.array([0.0]), np.array([float(o * i)]), [(1.0, 0, "abs")]) if is_forced[k]
            else projection_options(stats.proj[k], shapes[k], ("abs",), RankRule(max_rank=0)) for k, (o, i) in shapes.items()}
    plans = {
        "uniform": config_picks(stats, shapes, RSparseConfig(method="teal", sparsity=s, allocation="uniform"))[0],
        "uniform, forced dense": {k: (1.0, 0, "abs") if is_forced[k] else (1 - s_rest, 0, "abs") for k in shapes},
        "greedy": config_picks(stats, shapes, RSparseConfig(method="teal", sparsity=s, allocation="greedy"))[0],
        "greedy, forced dense": block_picks(stats, shapes, {b: s for b in block_keys(stats.proj)}, ("abs",), None, options=opts),
    }
    windows = data.token_windows(tok, "wiki", "eval", 1024, n=args.windows)
    rows = [{"plan": "dense", "expected_sparsity": 0.0, "ppl": perplexity(model, windows, progress=False)["ppl"]}]
    cfg = RSparseConfig(method="teal", sparsity=s, allocation="greedy")
    for name, picks in plans.items():
        m = copy.deepcopy(model)
        plan = build_plan(m, stats, cfg, picks=picks)
        sparsify_(m, plan)
        rows.append({"plan": name, "expected_sparsity": plan.expected_sparsity(), "ppl": perplexity(m, windows, progress=False)["ppl"]})
        print(f"{name:24s} expected {rows[-1]['expected_sparsity']:.3f}  ppl {rows[-1]['ppl']:.2f}", flush=True)
    out = {"sparsity": s, "forced_dense": sorted(forced), "others_sparsity_uniform": s_rest,
           "calib_tokens": args.calib_tokens, "eval_tokens": args.windows * 1024, "rows": rows}
    print(f"\nforced dense: {args.dense}; the others at {s_rest:.3f} when uniform")
    print(f"{'plan':24s} {'expected':>8s} {'ppl':>8s}")
    for r in rows:
        print(f"{r['plan']:24s} {r['expected_sparsity']:8.3f} {r['ppl']:8.2f}")
    if args.out:
        write_json(args.out, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
