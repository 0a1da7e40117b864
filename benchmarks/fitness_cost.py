"""Is KL to the dense model a cheaper fitness than cross-entropy (perplexity)? (issue 4)

fitness_rank.py showed that KL and CE rank *different* plans like evaluation perplexity does. The
search, though, compares *close* plans: an incumbent and its mutants. Here, per sparsity, the search's
seed plan and mutants of it made by the search's own operators (one group of blocks mutated, the
budget repaired, as in a generation of the search) are scored per calibration window by KL and by CE
(16 windows of 512 tokens, the search's 4 fitness windows first), and by perplexity on the
Wikipedia evaluation windows (the ground truth, per 1024-token window).
For each (seed, mutant) pair and each fitness f, with d_f the per-window differences:
- tokens needed: 512 * (2 sd(d_f) / mean(d_f))^2, the calibration tokens for a 2-sigma verdict;
- the verdict at the search's own budget (first 4 windows, 2048 tokens) and whether its sign
  matches the evaluation text's (counted only on pairs the evaluation text itself resolves, |z| > 2).
A fitness is cheaper if it needs fewer tokens for the same verdicts.

    python benchmarks/fitness_cost.py [--sparsities 0.5,0.7] [--mutants 10] [--windows 16]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rsparse import data
from rsparse.apply import modules_for, swapped
from rsparse.fitness import Fitness
from rsparse.pipeline import search_windows
from rsparse.plan import factors_of, layers_from_picks
from rsparse.search import Search, SearchConfig, Space

from fitness_rank import model_and_stats  # noqa: E402  (benchmarks/ is the script's directory)
from quality import OUT as QUALITY  # noqa: E402

RESULT = QUALITY.parent / "fitness_cost.json"
MIN_KEEP = {0.5: 0.0, 0.7: 0.1}  # the keep floor the searches in docs/results.md ran with


def mutants(space: Space, n: int, seed: int) -> list:
    """n genomes one search step away from the seed: the search's mutation operator on one group of
    blocks (groups in turn), the rest of the model fixed, the budget repaired on the group."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        search = Search(space, SearchConfig(), d, evaluate=None, progress=lambda *_: None)
        out = []
        for i in range(n):
            group = search.groups[i % len(search.groups)]
            free = np.array([b in group for b in space.blocks], dtype=np.float64)
            out.append(search._mutate(rng, space.seed(), group, free))
    return out


@torch.inference_mode()
def eval_windows_logppl(model, windows) -> list:
    """Mean next-token negative log-likelihood per evaluation window (log perplexity of each)."""
    out = []
    for w in windows:
        logits = model(w[None]).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    return out


def pair_stats(a: list, b: list, window: int) -> dict:
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    mean, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    z = mean / (sd / math.sqrt(len(d))) if sd > 0 else float("inf")
    need = window * (2 * sd / mean) ** 2 if mean != 0 else float("inf")
    return {"diff": mean, "z": z, "tokens_needed": need}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--mutants", type=int, default=10)
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of 512 tokens per plan")
    ap.add_argument("--wiki-windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    model, tok, stats, shapes = model_and_stats()
    base = SearchConfig()
    wins = search_windows(tok, stats, SearchConfig(fitness_tokens=args.windows * base.window, val_tokens=base.window))
    assert torch.equal(wins["fit"][: base.fitness_tokens // base.window],
                       search_windows(tok, stats, base)["fit"]), "the first windows are the search's own"
    fitness = Fitness(model, {"fit": wins["fit"]})
    evalw = data.token_windows(tok, "wiki", "eval", 1024, n=args.wiki_windows)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    results["setup"] = {k: v for k, v in vars(args).items() if k != "out"}
    done = {(r["name"], r["target"]) for r in results["rows"]}
    for s in map(float, args.sparsities.split(",")):
        space = Space(stats, shapes, s, ("abs",), None, MIN_KEEP.get(s, 0.0))
        plans = {"seed": space.seed(), **{f"mutant{i}": g for i, g in enumerate(mutants(space, args.mutants, args.seed))}}
        for name, genome in plans.items():
            if (name, s) in done:
                continue
            t0 = time.time()
            layers = layers_from_picks(stats, space.decode(genome))
            mods = modules_for(model, layers, factors_of(model, stats, layers, "aware"))
            r = fitness(mods, "fit", per_token=True)
            with swapped(model, mods):
                ev = eval_windows_logppl(model, evalw)
            row = {"name": name, "target": s, "kl_windows": r["kl_tokens"].mean(1).tolist(),
                   "ce_windows": r["ce_tokens"].mean(1).tolist(), "eval_logppl_windows": ev,
                   "ppl_wiki": math.exp(statistics.fmean(ev)), "seconds": round(time.time() - t0, 1)}
            results["rows"].append(row)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, args.out)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_windows")}), flush=True)
    report(results)


def report(results) -> None:
    window, search_windows_n = SearchConfig().window, SearchConfig().fitness_tokens // SearchConfig().window
    summary = {}
    print(f"{'s':>4s} {'pair':16s} {'eval dlogppl':>12s} {'z':>6s} {'KL need':>9s} {'CE need':>9s} {'KL@2048 ok':>10s} {'CE@2048 ok':>10s}")
    for s in sorted({r["target"] for r in results["rows"]}):
        rows = {r["name"]: r for r in results["rows"] if r["target"] == s}
        if "seed" not in rows:
            continue
        seed, pairs = rows["seed"], []
        for name, r in sorted(rows.items()):
            if name == "seed":
                continue
            ev = pair_stats(seed["eval_logppl_windows"], r["eval_logppl_windows"], 1024)
            p = {"pair": name, "eval": ev}
            for f in ("kl", "ce"):
                p[f] = pair_stats(seed[f"{f}_windows"], r[f"{f}_windows"], window)
                at = pair_stats(seed[f"{f}_windows"][:search_windows_n], r[f"{f}_windows"][:search_windows_n], window)
                p[f"{f}_search_sign_ok"] = (at["diff"] > 0) == (ev["diff"] > 0) if abs(ev["z"]) > 2 else None
            pairs.append(p)
            print(f"{s:4.2f} {name:16s} {ev['diff']:12.4f} {ev['z']:6.1f} {p['kl']['tokens_needed']:9.0f} {p['ce']['tokens_needed']:9.0f} "
                  f"{str(p['kl_search_sign_ok']):>10s} {str(p['ce_search_sign_ok']):>10s}")
        resolved = [p for p in pairs if abs(p["eval"]["z"]) > 2]
        ratios = [p["ce"]["tokens_needed"] / p["kl"]["tokens_needed"] for p in pairs
                  if math.isfinite(p["ce"]["tokens_needed"]) and p["kl"]["tokens_needed"] > 0]
        summary[f"{s:g}"] = {
            "pairs": len(pairs), "resolved_by_eval": len(resolved),
            "median_tokens_needed": {f: statistics.median(p[f]["tokens_needed"] for p in pairs) for f in ("kl", "ce")} if pairs else None,
            "median_ce_over_kl_tokens": statistics.median(ratios) if ratios else None,
            "search_budget_sign_ok": {f: sum(bool(p[f"{f}_search_sign_ok"]) for p in resolved) for f in ("kl", "ce")},
            "pairs_detail": pairs}
        print(f"  {s:g}: {len(pairs)} pairs ({len(resolved)} resolved by the evaluation text); median tokens for a 2-sigma verdict "
              f"KL {summary[f'{s:g}']['median_tokens_needed']['kl']:.0f}, CE {summary[f'{s:g}']['median_tokens_needed']['ce']:.0f}; "
              f"median CE/KL {summary[f'{s:g}']['median_ce_over_kl_tokens']:.2f}; right sign at the search's 2048 tokens: "
              f"KL {summary[f'{s:g}']['search_budget_sign_ok']['kl']}/{len(resolved)}, CE {summary[f'{s:g}']['search_budget_sign_ok']['ce']}/{len(resolved)}")
    print(json.dumps({"fitness_cost": {k: {kk: vv for kk, vv in v.items() if kk != "pairs_detail"} for k, v in summary.items()}}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
