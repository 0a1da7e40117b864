"""Does the search's fitness rank allocations the way evaluation perplexity does? (issue 4)

For each sparsity, a set of allocations that differ a lot (the standard ones, the searched plans
found in the rsparse cache, and random feasible genomes of the search space, with and without the
keep floor) is scored three ways on the same model:
- KL to the dense model and cross-entropy (= log perplexity) on the search's fitness windows and on
  its validation windows (calibration text the statistics never saw), as the search computes them;
- perplexity on the first Wikipedia-evaluation and LAMBADA windows the quality sweep uses (text
  the search never sees), and the realised sparsity there.
Then Spearman rank correlations: fitness (KL or CE) against evaluation perplexity. A fitness is fit
for the search if it ranks plans like the evaluation text does.

    python benchmarks/fitness_rank.py [--sparsities 0.5,0.7] [--random 6] [--wiki-windows 8] [--lambada-windows 4]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import rsparse
from rsparse import artifact, data, evaluate
from rsparse.apply import measure_sparsity, modules_for, swapped
from rsparse.assets import cache_dir
from rsparse.errors import RSparseError
from rsparse.fitness import Fitness
from rsparse.pipeline import BASELINES, search_windows
from rsparse.plan import RSparseConfig, config_picks, factors_of, layers_from_picks, shapes_of
from rsparse.search import SearchConfig, Space

from quality import OUT as QUALITY, cached_stats  # noqa: E402  (benchmarks/ is the script's directory)

RESULT = QUALITY.parent / "fitness_rank.json"


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(np.asarray(v, dtype=np.float64))) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def concordance(a, b) -> float:
    """Fraction of pairs of plans that a and b put in the same order."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    return sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) / max(len(pairs), 1)


def candidates(model, stats, shapes, s: float, n_random: int, rng) -> dict:
    """{name: (layers, factors)} of the allocations compared at sparsity s."""
    def from_picks(picks):
        layers = layers_from_picks(stats, picks)
        return layers, factors_of(model, stats, layers, "aware")

    out = {name: from_picks(config_picks(stats, shapes, RSparseConfig(sparsity=s, **kw))[0]) for name, kw in BASELINES.items()}
    for floor in (0.0, 0.1):
        space = Space(stats, shapes, s, ("abs",), None, floor)  # the default plan's score
        if floor:
            out[f"rsparse-auto-floor{floor:g}"] = from_picks(space.decode(space.seed()))
        for i in range(n_random // 2):  # whole-model random genomes, repaired onto the budget
            g = space.seed()
            sb = np.array(g["s"]) + rng.normal(0.0, 0.08, len(g["s"]))
            w = np.array(g["w"]) + rng.normal(0.0, 1.0, len(g["w"]))
            genome = {"s": space.repair(sb, np.ones(len(sb))).tolist(), "w": w.tolist()}
            out[f"random{i}-floor{floor:g}"] = from_picks(space.decode(genome))
    for d in sorted((cache_dir() / "search").glob(f"{model.rsparse_model_id}-*-{s:g}")):
        if (d / "plan.json").is_file():
            try:
                plan = artifact.load(d)
            except RSparseError as e:
                print(f"skipping {d}: {e}")
                continue
            out[f"searched:{d.name}"] = (plan.layers, plan.factors)
    return out


def model_and_stats():
    """The default model, its tokenizer, the quality sweep's cached calibration statistics and shapes."""
    model, tok = rsparse.load()
    stats = cached_stats(model, tok, json.loads(QUALITY.read_text())["setup"]["calib_tokens"], {})
    return model, tok, stats, shapes_of(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--random", type=int, default=6, help="random genomes per sparsity (half with the keep floor)")
    ap.add_argument("--wiki-windows", type=int, default=8)
    ap.add_argument("--lambada-windows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    model, tok, stats, shapes = model_and_stats()
    texts = {"wiki": data.token_windows(tok, "wiki", "eval", 1024, n=args.wiki_windows),
             "lambada": data.token_windows(tok, "lambada", "eval", 1024, n=args.lambada_windows)}
    fitness = Fitness(model, search_windows(tok, stats, SearchConfig()))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    results["setup"] = {k: v for k, v in vars(args).items() if k != "out"}
    done = {(r["name"], r["target"]) for r in results["rows"]}
    rng = np.random.default_rng(args.seed)
    for s in map(float, args.sparsities.split(",")):
        for name, (layers, factors) in candidates(model, stats, shapes, s, args.random, rng).items():
            if (name, s) in done:
                continue
            t0 = time.time()
            mods = modules_for(model, layers, factors)
            row = {"name": name, "target": s, "windows": {"wiki": args.wiki_windows, "lambada": args.lambada_windows}}
            for split in ("fit", "val"):
                r = fitness(mods, split)
                row[f"kl_{split}"], row[f"ce_{split}"] = r["kl"], r["ce"]
            with swapped(model, mods):
                row["realized"] = measure_sparsity(model, texts["wiki"][:4], shapes)["sparsity"]
                for tname, w in texts.items():
                    row[f"ppl_{tname}"] = evaluate.perplexity(model, w, progress=False)["ppl"]
            row["seconds"] = round(time.time() - t0, 1)
            results["rows"].append(row)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, args.out)
            print(json.dumps(row), flush=True)
    report(results)


def report(results) -> None:
    print(f"\n{'plan':42s} {'s':>4s} {'KL fit':>7s} {'KL val':>7s} {'CE fit':>7s} {'real':>6s} {'ppl wiki':>9s} {'ppl lamb':>9s}")
    summary = {}
    for s in sorted({r["target"] for r in results["rows"]}):
        rows = sorted((r for r in results["rows"] if r["target"] == s), key=lambda r: r["kl_fit"])
        for r in rows:
            print(f"{r['name']:42s} {s:4.2f} {r['kl_fit']:7.3f} {r['kl_val']:7.3f} {r['ce_fit']:7.3f} {r['realized']:6.3f} "
                  f"{r['ppl_wiki']:9.2f} {r['ppl_lambada']:9.2f}")
        seen, distinct = set(), []  # an allocation reached two ways (rsparse-uniform = teal-uniform at 50%) counts once
        for r in rows:
            if (r["kl_fit"], r["ce_fit"]) not in seen:
                seen.add((r["kl_fit"], r["ce_fit"]))
                distinct.append(r)
        rows = distinct
        if len(rows) < 3:
            continue
        pairs = {f"{f}_{split}~{t}": ([r[f"{f}_{split}"] for r in rows], [math.log(r[f"ppl_{t}"]) for r in rows])
                 for f in ("kl", "ce") for split in ("fit", "val") for t in ("wiki", "lambada")}
        pairs["kl_fit~ce_fit"] = ([r["kl_fit"] for r in rows], [r["ce_fit"] for r in rows])
        corr = {k: round(spearman(a, b), 3) for k, (a, b) in pairs.items()}
        same = {k: round(concordance(a, b), 3) for k, (a, b) in pairs.items()}
        summary[f"{s:g}"] = {"plans": len(rows), "spearman": corr, "pairs_in_same_order": same}
        print(f"  at {s:g} over {len(rows)} plans, Spearman (pairs in the same order): "
              + ", ".join(f"{k} {v:+.2f} ({same[k]:.2f})" for k, v in corr.items()))
    print(json.dumps({"fitness_rank": summary}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
