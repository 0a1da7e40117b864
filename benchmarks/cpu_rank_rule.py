"""Do plans priced for the GPU (`--target gpu`) cost or gain decode speed on the CPU? (session 29)

On SmolLM2 at 50% the default plan puts rank terms on 81 of 210 projections (mostly ranks 1-12),
ranks in multiples of 16 on 16, `--target gpu` on 1, TEAL-greedy on none (docs/results.md, "Ranks
priced for the GPU"). On the CPU the C++ kernel adds each ranked projection's z = A x_dropped in its
compaction pass and U z in its output loop, so fewer ranked projections might also decode faster
there. Here: one calibration (`--calib-tokens`), the four plans at `--sparsity`, each on the C++
backend, plus the dense model (the bench's fastest layouts), batch 1, greedy decode of
`--tokens` steps, the models alternated over `--repeats` rounds; medians of the per-step times.
Prints a table, ends with one JSON line; writes benchmarks/results/cpu_rank_rule.json (or --out).
    python3 benchmarks/cpu_rank_rule.py [--sparsity 0.5 --tokens 32 --repeats 5]
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from quality import rank_use
from rsparse.atomic import write_json
from rsparse.bench import PROMPT, _step_times, fastest_dense_, sparse_model
from rsparse.models import load
from rsparse.pipeline import observe
from rsparse.plan import RSparseConfig, build_plan

PLANS = {"default": {}, "ranks x16": {"rank_multiple": 16}, "--target gpu": {"rank_multiple": 16, "rank_cost": 3.0},
         "teal-greedy": {"method": "teal", "allocation": "greedy"}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_rank_rule.json"))
    args = ap.parse_args()
    dense, tok = load(args.model, "float32")
    fastest_dense_(dense)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    calib, _ = load(args.model, "float32")
    stats = observe(calib, tok, tokens=args.calib_tokens, scores=("abs",))
    models, plans = {"dense": dense}, {}
    for name, kw in PLANS.items():
        plans[name] = build_plan(calib, stats, RSparseConfig(sparsity=args.sparsity, **kw))
        models[name] = sparse_model(args.model, "float32", plans[name], "cpp")
        models[name].lm_head = dense.lm_head  # the dense baseline's (fastest) lm_head layout
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(args.repeats):  # alternated: drift hits every model alike
            for k, m in models.items():
                times[k] += _step_times(m, prompt, args.tokens)
    dense_s = statistics.median(times["dense"])
    rows = []
    print(f"{args.model}, float32, batch 1, {torch.get_num_threads()} threads, sparsity {args.sparsity}, C++ backend")
    print(f"{'plan':14s} {'ranked':>6s} {'factor share':>12s} {'expected':>8s} {'ms/token':>8s} {'tok/s':>6s} {'x dense':>7s}")
    for k, t in times.items():
        s = statistics.median(t)
        plan = plans.get(k)
        use = rank_use(plan) if plan else {"ranked": 0, "rank_share": 0.0}
        row = {"plan": k, "ranked": use["ranked"], "factor_share": use["rank_share"],
               "expected": plan.expected_sparsity() if plan else 0.0, "ms": s * 1e3, "tok_s": 1 / s, "x_dense": dense_s / s}
        rows.append(row)
        print(f"{k:14s} {row['ranked']:6d} {100 * row['factor_share']:11.2f}% {row['expected']:8.4f} {row['ms']:8.2f} "
              f"{row['tok_s']:6.1f} {row['x_dense']:7.2f}")
    result = {"model": args.model, "sparsity": args.sparsity, "calib_tokens": args.calib_tokens, "tokens": args.tokens,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "rows": rows}
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
