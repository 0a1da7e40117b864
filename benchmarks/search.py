"""Searched R-Sparse plans on the bundled model, evaluated like every other row of quality.json.

For each sparsity: `search_plan` with default settings (group-wise evolutionary search, KL fitness on
calibration windows the statistics never saw, validation guard), from the same cached 64k-token
calibration as benchmarks/quality.py; then perplexity on the same Wikipedia-eval and LAMBADA windows,
optionally the 8 tasks (decode protocol). Rows "rsparse-evo" are appended to quality.json; the KL of
the standard allocations on the same fitness/validation windows comes from the search itself.

    python benchmarks/search.py [--sparsities 0.5,0.7] [--budget-minutes 25] [--tasks-at 0.5] [--limit 100]
                                [--method rsparse|teal] [--min-keep 0.1] [--fitness kl|ce] [--refine-tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import rsparse
from rsparse import data
from rsparse.assets import cache_dir
from rsparse.plan import RSparseConfig
from rsparse.search import SearchConfig

from quality import OUT, _save, cached_stats, evaluate_row, report  # noqa: E402  (benchmarks/ is the script's directory)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--budget-minutes", type=float, default=None)
    ap.add_argument("--tasks-at", default="0.5", help="sparsities whose searched plan also gets the 8 tasks")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--method", default="rsparse", choices=["rsparse", "teal"])
    ap.add_argument("--min-keep", type=float, default=0.0, help="floor on every projection's kept fraction")
    ap.add_argument("--fitness", default="kl", choices=["kl", "ce"])
    ap.add_argument("--refine-tokens", type=int, default=0,
                    help="refine the found plan's thresholds on the sparse model (rows named ...-refined)")
    args = ap.parse_args()
    results = json.loads(OUT.read_text())
    setup = results["setup"]
    model, tok = rsparse.load()
    stats = cached_stats(model, tok, setup["calib_tokens"], results)
    texts = {"wiki": data.token_windows(tok, "wiki", "eval", 1024, n=setup["wiki_windows"]),
             "lambada": data.token_windows(tok, "lambada", "eval", 1024, n=setup["lambada_windows"])}
    name = f"{args.method}-evo" + (f"-minkeep{args.min_keep:g}" if args.min_keep else "") + ("-ce" if args.fitness == "ce" else "")
    name += "-refined" if args.refine_tokens else ""
    task_at = {float(s) for s in args.tasks_at.split(",") if s}
    for s in map(float, args.sparsities.split(",")):
        directory = cache_dir() / "search" / f"{model.rsparse_model_id}-{name}-{s}"
        t0 = time.time()
        m, _ = rsparse.load()
        plan = rsparse.search_plan(m, tok, RSparseConfig(method=args.method, sparsity=s),
                                   SearchConfig(budget_minutes=args.budget_minutes, min_keep=args.min_keep, fitness=args.fitness), directory, stats=stats,
                                   refine_tokens=args.refine_tokens)
        search_s = time.time() - t0
        rsparse.sparsify_(m, plan)
        kinds = ["ppl"] + (["tasks"] if s in task_at else [])
        for kind in kinds:
            old = [r for r in results["rows"] if r["name"] == name and r["target"] == s and r["kind"] == kind]
            if old and old[0].get("search", {}).get("evaluations") == plan.calibration["search"]["evaluations"]:
                continue  # this plan is evaluated already; a resumed search that went further replaces its row
            results["rows"] = [r for r in results["rows"] if not any(r is o for o in old)]
            t = time.time()
            row = {"name": name, "target": s, "kind": kind, "config": plan.config, "expected": plan.expected_sparsity(),
                   "search": plan.calibration["search"], "search_wall_seconds": round(search_s, 1)}
            row.update(evaluate_row(m, tok, plan, texts, kind, args.limit))
            row["seconds"] = round(time.time() - t, 1)
            results["rows"].append(row)
            _save(results)
            print(json.dumps({k: v for k, v in row.items() if k not in ("config", "search")}), flush=True)
        print(json.dumps({"sparsity": s, "search": plan.calibration["search"]}), flush=True)
    report(results)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
