"""Quality sweep on the bundled model: perplexity vs model-level sparsity for dense, TEAL
(uniform, greedy), CATS and R-Sparse (the paper's uniform recipe and our default plan), the
levers tried at 50%, and the 8 zero-shot tasks at 50% (decode protocol). Rows named "-refined" have
their thresholds refined on the sparse model's own activations (`rsparse.pipeline.refine`, what
`calibrate` does by default since session 31); the others keep the dense-activation thresholds.

One calibration pass (64k Wikipedia calibration tokens, both channel scores) feeds every plan.
Perplexity: every token sparse, non-overlapping 1024-token windows of the Wikipedia evaluation
split and of LAMBADA passages (fiction, another genre). Results are appended to
benchmarks/results/quality.json after each configuration (rerunning resumes), then a table is
printed and the plot docs/ppl_vs_sparsity.png is drawn.

    python benchmarks/quality.py [--wiki-windows 24] [--lambada-windows 12] [--limit 200]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

import rsparse
from rsparse import data, evaluate
from rsparse.apply import counting_kept, measure_sparsity
from rsparse.pipeline import refine
from rsparse.plan import RSparseConfig, build_plan

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "quality.json"

SWEEP = {
    "teal-uniform": dict(method="teal", allocation="uniform"),
    "teal-greedy": dict(method="teal", allocation="greedy"),
    "cats": dict(method="cats"),
    "rsparse-paper": dict(method="rsparse", allocation="uniform", alpha=0.95, factors="plain"),
    "rsparse": dict(method="rsparse"),  # the default plan
}
LEVERS = {  # at 50% only
    "rsparse-uniform-aware-a0.95": dict(method="rsparse", allocation="uniform", alpha=0.95, factors="aware"),
    "rsparse-uniform-aware-a0.9": dict(method="rsparse", allocation="uniform", alpha=0.9, factors="aware"),
    "rsparse-uniform-wnorm-a1": dict(method="rsparse", allocation="uniform", alpha=1.0, score="wnorm"),
    "rsparse-auto-plain": dict(method="rsparse", factors="plain"),
    "rsparse-auto-score-auto": dict(method="rsparse", score="auto"),
}
RANK_RULES = {  # ranks priced for the GPU (session 29): multiples of 16 alone, 3x factor bytes alone, both (--target gpu)
    "rsparse-control-s29": dict(method="rsparse"),  # the default plan again, calibrated in the same run as the three
    "rsparse-rank16": dict(method="rsparse", rank_multiple=16),
    "rsparse-rankcost3": dict(method="rsparse", rank_cost=3.0),
    "rsparse-target-gpu": dict(method="rsparse", rank_multiple=16, rank_cost=3.0),
}
FLOORS = {  # a keep floor against the 70% collapse of allocations without small ranks (session 29); on the default plan (session 30)
    "rsparse-floor0.1": dict(method="rsparse", min_keep=0.1),
    "rsparse-x16-floor0.1": dict(method="rsparse", rank_multiple=16, min_keep=0.1),
    "rsparse-target-gpu-floor0.1": dict(method="rsparse", rank_multiple=16, rank_cost=3.0, min_keep=0.1),
    "teal-greedy-floor0.1": dict(method="teal", allocation="greedy", min_keep=0.1),
}
REFINED = {  # thresholds refined on the sparse model's own activations (`pipeline.refine`, session 31: `calibrate`'s default)
    "rsparse-refined": dict(method="rsparse"),
    "teal-uniform-refined": dict(method="teal", allocation="uniform"),
    "teal-greedy-refined": dict(method="teal", allocation="greedy"),
}
TASK_METHODS = ("dense", "rsparse", "teal-uniform", "teal-greedy", "cats", "rsparse-paper")  # most wanted first


def _save(results):
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, OUT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wiki-windows", type=int, default=24)
    ap.add_argument("--lambada-windows", type=int, default=12)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--sparsities", default="0.4,0.5,0.6,0.7")
    ap.add_argument("--task-sparsities", default="0.5", help="sparsities of the 8-task rows")
    ap.add_argument("--rank-rule-sparsities", default="0.5", help="sparsities of the rank-rule rows (RANK_RULES)")
    ap.add_argument("--floor-sparsities", default="0.7", help="sparsities of the keep-floor rows (FLOORS)")
    ap.add_argument("--refined-sparsities", default="0.4,0.5,0.6,0.7", help="sparsities of the refined rows (REFINED)")
    ap.add_argument("--task-methods", default=",".join(TASK_METHODS), help="methods of the 8-task rows")
    ap.add_argument("--report", action="store_true", help="only print the tables (markdown) from quality.json")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    if args.report:
        print(markdown(results))
        plot(results)
        return
    results["setup"] = {k: v for k, v in vars(args).items() if k != "report"}
    done = {(r["name"], r["target"], r["kind"]) for r in results["rows"]}

    model, tok = rsparse.load()
    texts = {"wiki": data.token_windows(tok, "wiki", "eval", 1024, n=args.wiki_windows),
             "lambada": data.token_windows(tok, "lambada", "eval", 1024, n=args.lambada_windows)}
    stats = None

    jobs = [("dense", {"method": "dense"}, 0.0, "ppl")]
    for s in map(float, args.sparsities.split(",")):
        jobs += [(n, kw, s, "ppl") for n, kw in SWEEP.items()]
    jobs += [(n, kw, 0.5, "ppl") for n, kw in LEVERS.items()]
    for s in map(float, args.rank_rule_sparsities.split(",")):
        jobs += [(n, kw, s, "ppl") for n, kw in RANK_RULES.items()]
    for s in map(float, args.floor_sparsities.split(",")):
        jobs += [(n, kw, s, "ppl") for n, kw in FLOORS.items()]
    for s in map(float, args.refined_sparsities.split(",")):
        jobs += [(n, kw, s, "ppl") for n, kw in REFINED.items()]
    for s in map(float, args.task_sparsities.split(",")):
        jobs += [(n, ({"method": "dense"} if n == "dense" else {**SWEEP, **REFINED}[n]), s if n != "dense" else 0.0, "tasks")
                 for n in args.task_methods.split(",")]

    for name, kw, s, kind in jobs:
        if (name, s, kind) in done:
            continue
        m, _ = rsparse.load()
        cfg = RSparseConfig(sparsity=s, **kw)
        if stats is None and cfg.method != "dense":  # one calibration pass, only once it is needed
            stats = cached_stats(model, tok, args.calib_tokens, results)
        t = time.time()
        plan = build_plan(m, stats, cfg) if stats else rsparse.calibrate(m, tok, cfg)
        if name in REFINED:
            plan = refine(m, tok, plan, stats=stats)  # min(16384, calibration) tokens of the calibration text
        rsparse.sparsify_(m, plan)
        row = {"name": name, "target": s, "kind": kind, "config": plan.config,
               "expected": plan.expected_sparsity(), "plan_seconds": round(time.time() - t, 1), **rank_use(plan)}
        row.update(evaluate_row(m, tok, plan, texts, kind, args.limit))
        row["seconds"] = round(time.time() - t, 1)
        results["rows"].append(row)
        _save(results)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)

    report(results)


def rank_use(plan) -> dict:
    """How many projections carry rank terms, and the factors' share of the bytes the plan reads."""
    read = factors = 0.0
    for key, lp in plan.layers.items():
        if key in plan.shapes:
            o, i = plan.shapes[key]
            read += lp.keep * o * i + lp.rank * (o + i)
            factors += lp.rank * (o + i)
    return {"ranked": sum(lp.rank > 0 for lp in plan.layers.values()), "rank_share": factors / read if read else 0.0}


def evaluate_row(m, tok, plan, texts: dict, kind: str, limit: int) -> dict:
    """The measured fields of one row for a sparsified model: realised sparsity on 4 Wikipedia windows
    ("realized", as every row since session 1, so rows stay comparable), then perplexity on every text
    (kind "ppl"; "realized_<text>": the realised sparsity counted on all of that text's scored tokens,
    `apply.counting_kept`, rows from session 33 on) or the 8 tasks, decode protocol (kind "tasks")."""
    row = {"realized": measure_sparsity(m, texts["wiki"][:4], plan.shapes)["sparsity"] if plan.layers else 0.0}
    if kind == "ppl":
        for tname, w in texts.items():
            with counting_kept(m, plan.shapes) if plan.layers else contextlib.nullcontext({}) as seen:
                r = evaluate.perplexity(m, w)
            row[f"ppl_{tname}"], row[f"tokens_{tname}"] = r["ppl"], r["tokens"]
            if plan.layers:
                row[f"realized_{tname}"] = seen["sparsity"]
    else:
        row["tasks"] = evaluate.zero_shot(m, tok, limit=limit, protocol="decode")
    return row


def cached_stats(model, tok, tokens, results):
    """One calibration per (model, token count), kept in the rsparse cache across runs (not in git)."""
    from rsparse.assets import cache_dir

    path = cache_dir() / "stats" / f"{model.rsparse_model_id}-{tokens}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    t0 = time.time()
    stats = rsparse.observe(model, tok, tokens=tokens)
    results["calibration_seconds"] = round(time.time() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stats, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return stats


def report(results):
    rows = results["rows"]
    ppl = [r for r in rows if r["kind"] == "ppl"]
    dense = next(r for r in ppl if r["name"] == "dense")
    print(f"\n{'method':30s} {'target':>6s} {'expect':>6s} {'real':>6s} {'ppl wiki':>9s} {'Δ':>6s} {'ppl lamb':>9s} {'Δ':>6s}")
    for r in sorted(ppl, key=lambda r: (r["target"], r["name"])):
        print(f"{r['name']:30s} {r['target']:6.2f} {r['expected']:6.3f} {r['realized']:6.3f} {r['ppl_wiki']:9.3f} "
              f"{r['ppl_wiki'] - dense['ppl_wiki']:6.2f} {r['ppl_lambada']:9.3f} {r['ppl_lambada'] - dense['ppl_lambada']:6.2f}")
    task_rows = [r for r in rows if r["kind"] == "tasks"]
    if task_rows:
        names = [t for t in evaluate.TASKS]
        print(f"\n{'method (tasks, acc)':22s} " + " ".join(f"{t[:9]:>9s}" for t in names) + f" {'avg':>6s} {'avg_norm':>8s}")
        for r in task_rows:
            print(f"{r['name']:22s} " + " ".join(f"{r['tasks'][t]['acc']:9.3f}" for t in names)
                  + f" {r['tasks']['average']['acc']:6.3f} {r['tasks']['average']['acc_norm']:8.3f}")
    plot(results)
    best = {r["name"]: r["ppl_wiki"] for r in ppl if r["target"] == 0.5}
    print(json.dumps({"dense_ppl_wiki": dense["ppl_wiki"], "ppl_wiki_at_50": best}))


def markdown(results) -> str:
    """The tables of docs/results.md, generated from quality.json (no hand transcription)."""
    rows = results["rows"]
    ppl = [r for r in rows if r["kind"] == "ppl"]
    dense = next(r for r in ppl if r["name"] == "dense")
    out = ["| method | target | expected | realised (wiki) | ppl wiki | Δ wiki | ppl lambada | Δ lambada |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ppl, key=lambda r: (r["target"], r["name"])):
        out.append(f"| {r['name']} | {r['target']:.2f} | {r['expected']:.3f} | {r['realized']:.3f} | {r['ppl_wiki']:.2f} | "
                   f"{r['ppl_wiki'] - dense['ppl_wiki']:+.2f} | {r['ppl_lambada']:.2f} | {r['ppl_lambada'] - dense['ppl_lambada']:+.2f} |")
    task_rows = [r for r in rows if r["kind"] == "tasks"]
    if task_rows:
        out += ["", "| method | " + " | ".join(evaluate.TASKS) + " | average acc | average acc_norm |",
                "|---" * (len(evaluate.TASKS) + 3) + "|"]
        for r in task_rows:
            cells = " | ".join(f"{r['tasks'][t]['acc']:.3f} / {r['tasks'][t]['acc_norm']:.3f}" for t in evaluate.TASKS)
            out.append(f"| {r['name']} ({r['target']:.0%}, real {r['realized']:.3f}) | {cells} | "
                       f"{r['tasks']['average']['acc']:.3f} | {r['tasks']['average']['acc_norm']:.3f} |")
    return "\n".join(out)


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["kind"] == "ppl"]
    dense = next(r for r in rows if r["name"] == "dense")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, text in zip(axes, ("wiki", "lambada")):
        for name in (*SWEEP, *REFINED):  # refined rows dashed
            pts = sorted((r["realized"], r[f"ppl_{text}"]) for r in rows if r["name"] == name)
            if pts:
                ax.plot([0.0] + [p[0] for p in pts], [dense[f"ppl_{text}"]] + [p[1] for p in pts], marker="o", label=name,
                        linestyle="--" if name in REFINED else "-")
        ax.set_yscale("log")
        ax.set_xlabel("realised model-level sparsity (fraction of weight bytes not read)")
        ax.set_ylabel("perplexity (every token sparse)")
        ax.set_title(f"SmolLM2-135M, {text} ({dense['tokens_' + text]} tokens)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "ppl_vs_sparsity.png"
    fig.savefig(out.with_suffix(".tmp.png"), dpi=110)
    os.replace(out.with_suffix(".tmp.png"), out)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
