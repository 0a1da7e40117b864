"""Calibration time of `calibrate.collect` on the bundled model, side by side: both scores at every
rank with one SVD per projection (session 18) against one SVD per error table (before; emulated by
handing each table its own `spectrum`), and TEAL's collection (|x| only) at every rank (before)
against rank 0 alone (session 18: no SVD). 2048 calibration tokens, 256 sampled for the error tables,
2 rounds alternated; seconds per collection. Prints one JSON line per round (the last one is the
result); writes it to --out too.

    python3 benchmarks/calibration_time.py [--out benchmarks/results/calibration_time.json]
"""
import argparse
import importlib
import json
import time

from rsparse.atomic import write_json
from rsparse.models import load
from rsparse.pipeline import calibration_windows

cal = importlib.import_module("rsparse.calibrate")  # the package's `calibrate` function shadows the module name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, tok = load("smollm2-135m")
    win = calibration_windows(tok, tokens=2048)
    real_spec, real_table = cal.spectrum, cal.error_table
    own = object()  # collect's shared spectrum replaced by a marker: each table then takes its own SVD

    def per_table(W, X, h, c, r, svd=None):
        return real_table(W, X, h, c, r, real_spec(W) if svd is own else svd)

    def timed(**kw):
        t = time.perf_counter()
        cal.collect(model, win, sample_tokens=256, progress=False, **kw)
        return time.perf_counter() - t

    res = {}
    for _ in range(args.rounds):
        cal.spectrum, cal.error_table = (lambda W: own), per_table
        res.setdefault("both scores, all ranks, SVD per table (before)", []).append(timed())
        res.setdefault("abs only, all ranks, SVD per table (teal before)", []).append(timed(scores=("abs",)))
        cal.spectrum, cal.error_table = real_spec, real_table
        res.setdefault("both scores, all ranks, one SVD per projection (now)", []).append(timed())
        res.setdefault("abs only, rank 0, no SVD (teal now)", []).append(timed(scores=("abs",), ranks=(0,)))
        print(json.dumps({k: [round(x, 1) for x in v] for k, v in res.items()}), flush=True)
    if args.out:
        write_json(args.out, {"seconds": res, "tokens": 2048, "sample_tokens": 256})


if __name__ == "__main__":
    main()
