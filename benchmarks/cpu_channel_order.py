"""Would sorting a projection's input channels by how often they are kept make the kept Wt rows
contiguous? (The CPU kernel streams whole kept rows; with every row kept it matches MKL's GEMV, half
kept it loses ~12% per byte to the scattered rows: docs/perf-cpu.md, session 17.) Hot/cold channel
orders (PowerInfer's idea) pay only if per-channel keep frequencies are polarised.

On the bundled model (TEAL-greedy plan at 50%, thresholds from 4096 calibration tokens, 512 sampled
token rows), per projection: keep frequencies from the first half of the sample, then on the second
half the mean length of runs of consecutive kept rows, in the original channel order and sorted by
frequency. Prints a table and one JSON line; --out writes the JSON.

    python3 benchmarks/cpu_channel_order.py [--out benchmarks/results/cpu_channel_order.json]
"""
import argparse
import json

import numpy as np

from rsparse.atomic import write_json
from rsparse.models import load
from rsparse.pipeline import observe
from rsparse.plan import RSparseConfig, build_plan


def mean_run(mask: np.ndarray) -> float:
    """Mean length of the runs of consecutive True along each row, averaged over rows."""
    out = []
    for m in mask:
        d = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
        starts, ends = np.where(d == 1)[0], np.where(d == -1)[0]
        out.append((ends - starts).mean() if len(starts) else 0.0)
    return float(np.mean(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    model, tok = load("smollm2-135m")
    stats = observe(model, tok, tokens=4096, sample_tokens=512, scores=("abs",), ranks=(0,), progress=False)
    plan = build_plan(model, stats, RSparseConfig(method="teal", sparsity=0.5, allocation="greedy"))
    rows = []
    for key, lp in plan.layers.items():
        X = stats.proj[key].sample[0]
        keep = (X.abs() > lp.tau).numpy()
        half = len(keep) // 2
        freq = keep[:half].mean(0)
        test = keep[half:]
        rows.append({"key": key, "kept": float(test.mean()), "freq_p10": float(np.quantile(freq, 0.1)),
                     "freq_p90": float(np.quantile(freq, 0.9)), "run_original": mean_run(test),
                     "run_sorted": mean_run(test[:, np.argsort(-freq, kind="stable")])})
    print(f"{'projection':10s} {'kept':>5s} {'freq p10':>8s} {'freq p90':>8s} {'run orig':>8s} {'run sorted':>10s}")
    for r in rows[::15]:
        print(f"{r['key']:10s} {r['kept']:5.2f} {r['freq_p10']:8.2f} {r['freq_p90']:8.2f} {r['run_original']:8.2f} {r['run_sorted']:10.2f}")
    by = lambda p: [r for r in rows if r["key"].split(".")[1] == p]  # noqa: E731
    summary = {p: {"run_original": float(np.mean([r["run_original"] for r in by(p)])),
                   "run_sorted": float(np.mean([r["run_sorted"] for r in by(p)]))}
               for p in ("q", "k", "v", "o", "gate", "up", "down")}
    result = {"median_run_gain": float(np.median([r["run_sorted"] / max(r["run_original"], 1e-9) for r in rows])),
              "by_projection": summary}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, {**result, "rows": rows})


if __name__ == "__main__":
    main()
