"""How steady is a plan's realised sparsity from one text to the next? (session 32)

For each plan (thresholds refined on 16,384 calibration tokens, as `calibrate` does), the realised
model-level byte sparsity on consecutive 4-window chunks (4,096 tokens) of the refinement's own
windows and of the 24 Wikipedia evaluation windows. quality.py's "realized" column is one such chunk
(the first 4 evaluation windows), so the spread here is that column's error bar.

    PYTHONPATH=src:benchmarks python benchmarks/realised_spread.py [--sparsities 0.5,0.7]
Prints a table and one JSON line; writes benchmarks/results/realised_spread.json.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

import rsparse
from rsparse import data
from rsparse.apply import measure_sparsity
from rsparse.atomic import write_json
from rsparse.pipeline import calibration_windows
from rsparse.plan import RSparseConfig, build_plan
from rsparse.refine import refine_thresholds_

from quality import cached_stats  # noqa: E402  (benchmarks/ is the script's directory)

PLANS = {"rsparse": dict(method="rsparse"), "teal-uniform": dict(method="teal", allocation="uniform"),
         "teal-greedy": dict(method="teal", allocation="greedy")}
OUT = Path(__file__).resolve().parent / "results" / "realised_spread.json"


def chunks(model, windows, shapes, size=4):
    return [measure_sparsity(model, windows[i:i + size], shapes)["sparsity"] for i in range(0, len(windows), size)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--refine-tokens", type=int, default=16384)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = rsparse.load()
    stats = cached_stats(model, tok, 65536, {})
    ev = data.token_windows(tok, "wiki", "eval", 1024, n=24)
    cal = calibration_windows(tok, "wiki", args.refine_tokens, 1024, 0)
    rows = []
    for s in map(float, args.sparsities.split(",")):
        for name, kw in PLANS.items():
            m, _ = rsparse.load()
            plan = build_plan(m, stats, RSparseConfig(sparsity=s, **kw))
            rsparse.sparsify_(m, plan)
            refine_thresholds_(m, plan, cal)
            c, e = chunks(m, cal, plan.shapes), chunks(m, ev, plan.shapes)
            rows.append({"plan": name, "target": s, "calib_chunks": c, "eval_chunks": e,
                         "calib_mean": statistics.fmean(c), "eval_mean": statistics.fmean(e),
                         "eval_sd": statistics.stdev(e), "eval_min": min(e), "eval_max": max(e)})
            r = rows[-1]
            print(f"{name:14s} {s:.2f}  calib {r['calib_mean']:.4f}  eval {r['eval_mean']:.4f} "
                  f"sd {r['eval_sd']:.4f}  range {r['eval_min']:.3f}-{r['eval_max']:.3f}", flush=True)
    result = {"refine_tokens": args.refine_tokens, "chunk_tokens": 4096, "rows": rows}
    write_json(OUT, result)
    print(json.dumps({f"{r['plan']}_{r['target']:g}_eval_sd": round(r["eval_sd"], 4) for r in rows}))


if __name__ == "__main__":
    main()
