"""Where should a byte budget go: the blocks or the lm_head? Perplexity at equal bytes per token.

For each budget (the bytes a token reads with the blocks at sparsity s and a dense lm_head) and each
head sparsity h, the blocks' sparsity s' is solved so that blocks + head read the same bytes:
    (1 - s') B + (1 - h) H = (1 - s) B + H   =>   s' = s - h H / B   (B, H: dense block / head elements)
Every plan is the default R-Sparse plan (`rsparse.calibrate`, thresholds refined through the sparse
model) with `head_sparsity=h`, all from one calibration pass. Perplexity: every token sparse, the first
non-overlapping 1024-token windows of the Wikipedia evaluation split; the realised whole-model byte
sparsity is counted on the same tokens. Results are appended to benchmarks/results/head_budget.json
after each row (rerunning resumes), then a table and one JSON line are printed.

`--auto` adds, per budget, the plan `head_sparsity="auto"` makes at the same total bytes (the head and
the blocks at the total sparsity T = 1 - read / (B + H)), and `--search-minutes M` the searched one
(`search_plan` with the head's share a gene, default search settings, stopped after M minutes, its
thresholds refined on 16384 tokens as `calibrate` refines). Row kinds: "grid", "auto", "evo".

    python benchmarks/head_budget.py [--budgets 0.5,0.6] [--heads 0,0.2,0.3,0.5] [--windows 8] [--calib-tokens 16384]
                                     [--auto] [--search-minutes 15]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import rsparse
from rsparse import data, evaluate
from rsparse.apply import counting_kept
from rsparse.atomic import write_json
from rsparse.assets import cache_dir
from rsparse.families import HEAD
from rsparse.pipeline import search_plan
from rsparse.plan import RSparseConfig, shapes_of, total_sparsity
from rsparse.search import SearchConfig

OUT = Path(__file__).resolve().parent / "results" / "head_budget.json"


def block_sparsity(s: float, h: float, blocks: int, head: int) -> float:
    """The blocks' sparsity that reads what blocks at s with a dense head read, the head at h."""
    return s - h * head / blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.5,0.6")
    ap.add_argument("--heads", default="0,0.2,0.3,0.5")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--auto", action="store_true", help="also the head_sparsity='auto' plan per budget")
    ap.add_argument("--search-minutes", type=float, default=0.0, help="also a searched auto plan per budget (0: none)")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    done = {(r["budget"], r.get("kind", "grid"), r["head_sparsity"]) for r in results["rows"]}
    model, tok = rsparse.load()
    shapes = shapes_of(model)
    B = sum(o * i for o, i in shapes.values())
    head_shape = list(model.lm_head.weight.shape)
    H = head_shape[0] * head_shape[1]
    win = data.token_windows(tok, "wiki", "eval", 1024, n=args.windows)
    if "dense_ppl" not in results:
        results["dense_ppl"] = evaluate.perplexity(model, win, progress=False)["ppl"]
    t0 = time.time()
    stats = rsparse.observe(model, tok, tokens=args.calib_tokens, progress=False)
    print(f"calibration: {time.time() - t0:.0f} s; blocks {B / 1e6:.1f} M elements, lm_head {H / 1e6:.1f} M "
          f"({100 * H / (B + H):.1f}% of the weights a token reads)", flush=True)
    def measure(s, kind, make):
        m, _ = rsparse.load()
        t = time.time()
        plan = make(m)
        h = 1.0 - plan.layers[HEAD].keep if HEAD in plan.layers else 0.0
        rsparse.sparsify_(m, plan)
        with counting_kept(m, plan.shapes) as real:
            ppl = evaluate.perplexity(m, win, progress=False)["ppl"]
        row = {"budget": s, "kind": kind, "head_sparsity": h, "block_sparsity": plan.expected_sparsity(), "ppl": ppl,
               "ppl_rel": ppl / results["dense_ppl"] - 1, "expected_total_sparsity": plan.expected_total_sparsity(),
               "realised_total_sparsity": total_sparsity(real["layers"], plan.shapes, head_shape),
               "realised_block_sparsity": real["sparsity"], "seconds": round(time.time() - t, 1)}
        if "search" in plan.calibration:
            row["search"] = {k: plan.calibration["search"][k] for k in ("seconds", "evaluations", "fit", "val", "seed_fit", "seed_val")}
        results["rows"].append(row)
        results.update(windows=args.windows, calib_tokens=args.calib_tokens, blocks_elements=B, head_elements=H)
        write_json(out, results)
        print(f"budget {s:.2f} {kind} head {h:.3f} blocks {row['block_sparsity']:.3f}: ppl {ppl:.3f} ({100 * row['ppl_rel']:+.1f}%), "
              f"total sparsity expected {row['expected_total_sparsity']:.4f} realised {row['realised_total_sparsity']:.4f}",
              flush=True)

    kinds = [k for k, on in (("auto", args.auto), ("evo", args.search_minutes > 0)) if on]
    for s in (float(v) for v in args.budgets.split(",")):
        total = 1.0 - ((1.0 - s) * B + H) / (B + H)  # the budget as a sparsity of every weight a token reads
        for h in (float(v) for v in args.heads.split(",") if v):
            if (s, "grid", h) not in done:
                measure(s, "grid", lambda m, sb=block_sparsity(s, h, B, H), h=h:
                        rsparse.calibrate(m, tok, RSparseConfig(sparsity=sb, head_sparsity=h), stats=stats))
        for kind in kinds:
            if any(r["budget"] == s and r.get("kind") == kind for r in results["rows"]):
                continue
            config = RSparseConfig(sparsity=total, head_sparsity="auto")
            if kind == "auto":
                measure(s, kind, lambda m: rsparse.calibrate(m, tok, config, stats=stats))
            else:
                directory = cache_dir() / "head_search" / f"{s:.2f}"  # its state (not in git): a rerun resumes the search
                scfg = SearchConfig(budget_minutes=args.search_minutes)
                measure(s, kind, lambda m: search_plan(m, tok, config, scfg, directory, stats=stats, baselines=False,
                                                       refine_tokens=16384))
    print(f"\ndense perplexity {results['dense_ppl']:.3f} ({args.windows} windows of 1024)")
    print("| budget (blocks at, head dense) | plan | head sparsity | blocks sparsity | total sparsity realised | ppl | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results["rows"], key=lambda r: (r["budget"], r.get("kind", "grid"), r["head_sparsity"])):
        print(f"| {r['budget']:.2f} | {r.get('kind', 'grid')} | {r['head_sparsity']:.3f} | {r['block_sparsity']:.3f} "
              f"| {r['realised_total_sparsity']:.4f} | {r['ppl']:.3f} | {100 * r['ppl_rel']:+.1f}% |")
    best = {s: min((r for r in results["rows"] if r["budget"] == s), key=lambda r: r["ppl"]) for s in {r["budget"] for r in results["rows"]}}
    print(json.dumps({"dense_ppl": results["dense_ppl"], "best_by_budget": {str(s): [r.get("kind", "grid"), r["head_sparsity"]]
                                                                             for s, r in best.items()}, "rows": results["rows"]}))


if __name__ == "__main__":
    main()
