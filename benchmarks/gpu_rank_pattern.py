"""Does a plan with few ranked projections keep the r = 0 speed? (session 29, `--target gpu` plans)

Why: on SmolLM2 at 50% the default plan puts rank terms on 81 of 210 projections, most of them ranks
1-12; with ranks in multiples of 16 only 16 projections keep them at the same perplexity, and with
factor bytes priced at 3x only 1 (docs/results.md, "Ranks priced for the GPU"). On the GPU each
ranked call carries a fixed cost, so what matters is how many calls are ranked. The bundled model's
plans do not run on 8B shapes, so this times the pattern instead: Llama-3-8B shapes, random bf16
weights, every projection at `--sparsity` by the budget, the rank of `--alpha` on the projections a
pattern names and r = 0 elsewhere (a q|k|v group is ranked when q is). Graphed eager steps (the
kernels a compiled step runs, within 1-3% of it in sessions 24-29), batch 1, patterns alternated
over rounds, medians.
Prints a table, ends with one JSON line; writes $OUT/gpu_rank_pattern_a<alpha>.json.
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_rank_pattern.py [--sparsity 0.5 --alpha 0.9 --rounds 3]
"""
import argparse
import json
import os
import statistics

import torch

from rsparse.apply import swapped
from rsparse.atomic import write_json
from rsparse.decode import GraphDecoder
from rsparse.families import locate
from rsparse.gpubench import MAX_LEN, REPEATS, capture, time_graph
from rsparse.gpumodel import attached, build, input_samples, modules_at, set_thresholds
from rsparse.kernels.module import triton_groups

PATTERNS = {"r = 0": lambda p: False, "q ranked": lambda p: p == "q",
            "attention ranked (q, k, v, o)": lambda p: p in ("q", "k", "v", "o"),
            "MLP ranked (gate, up, down)": lambda p: p in ("gate", "up", "down"), "every projection ranked": lambda p: True}


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.model)
    projs = locate(model)
    samples = input_samples(model)
    r0, _ = modules_at(projs, args.sparsity, 1.0)
    ranked, quantile = modules_at(projs, args.sparsity, args.alpha)
    sets = {}
    for name, pick in PATTERNS.items():
        mods = {k: ranked[k] if pick(k.split(".")[1]) else r0[k] for k in projs}
        set_thresholds({k: m.tau for k, m in mods.items()}, samples, {k: quantile[k] for k in mods if mods[k] is ranked[k]},
                       args.sparsity)
        sets[name] = mods
    # groups once every threshold is set: a group copies its members' thresholds when built
    groups = {name: triton_groups(model, mods) for name, mods in sets.items()}
    dec = GraphDecoder(model, max_len=MAX_LEN, batch=1)
    times = {name: [] for name in ["dense", *sets]}
    for _ in range(args.rounds):
        for name in times:
            mods, grp = (sets[name], groups[name]) if name in sets else ({}, {})
            with swapped(model, mods), attached(model, grp):
                g, out = capture(dec.step, 1)
                if not torch.isfinite(out.float()).all():
                    raise SystemExit(f"{name}: non-finite logits")
                times[name] += [time_graph(g) for _ in range(REPEATS)]
                del g
    dense_ms = statistics.median(times["dense"]) * 1e3
    rows = []
    print(f"{args.model}, batch 1, sparsity {args.sparsity}, alpha {args.alpha} where ranked; graphed eager step")
    print(f"{'pattern':30s} {'ranked projs':>12s} {'ms/step':>8s} {'tok/s':>7s} {'x dense':>7s} {'vs r = 0':>8s}")
    for name in times:
        ms = statistics.median(times[name]) * 1e3
        n = 0 if name == "dense" else sum(1 for k in projs if sets[name][k] is ranked[k] and ranked[k].rank > 0)
        rows.append({"pattern": name, "ranked_projections": n, "ms": ms, "tok_s": 1e3 / ms, "x_dense": dense_ms / ms})
    base = next(r["ms"] for r in rows if r["pattern"] == "r = 0")
    for r in rows:
        r["ms_over_r0"] = r["ms"] - base
        print(f"{r['pattern']:30s} {r['ranked_projections']:12d} {r['ms']:8.3f} {r['tok_s']:7.1f} {r['x_dense']:7.2f} {r['ms_over_r0']:+8.3f}")
    result = {"model": args.model, "sparsity": args.sparsity, "alpha": args.alpha, "rounds": args.rounds, "rows": rows}
    if os.environ.get("OUT"):
        write_json(os.path.join(os.environ["OUT"], f"gpu_rank_pattern_a{args.alpha:g}.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
