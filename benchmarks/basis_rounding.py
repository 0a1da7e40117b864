"""Check: does the search's basis cache (factors whitened at a rounded kept fraction) change a plan's
fitness? The default 70% plan is scored with exact factors (as `build_plan` makes them), with bases at
the kept fraction rounded to the nearest 0.05 but at least 0.05 (the search before session 4), and
rounded down to 0.05 (since session 4), on the search's fitness windows.

    python benchmarks/basis_rounding.py [--sparsity 0.7]
"""
import argparse
import json
from dataclasses import replace

import rsparse
from rsparse.apply import modules_for
from rsparse.fitness import Fitness
from rsparse.pipeline import basis_keep, search_windows
from rsparse.plan import RSparseConfig, config_picks, factor_basis, factors_of, layers_from_picks, shapes_of
from rsparse.search import SearchConfig

from quality import OUT as QUALITY, cached_stats  # noqa: E402  (benchmarks/ is the script's directory)

ROUNDINGS = {"exact": None,
             "nearest, >= 0.05 (before)": lambda k: min(1.0, max(0.05, round(k * 20) / 20)),
             "down (now)": basis_keep}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args()
    model, tok = rsparse.load()
    stats = cached_stats(model, tok, json.loads(QUALITY.read_text())["setup"]["calib_tokens"], {})
    picks, _ = config_picks(stats, shapes_of(model), RSparseConfig(sparsity=args.sparsity))
    layers = layers_from_picks(stats, picks)
    fitness = Fitness(model, search_windows(tok, stats, SearchConfig()))
    out = {}
    for name, rnd in ROUNDINGS.items():
        def basis(key, W, lp, rnd=rnd):
            kq = rnd(lp.keep)
            return factor_basis(W, stats.proj[key], replace(lp, keep=kq, tau=stats.proj[key].hist[lp.score].quantile(1.0 - kq)), "aware")

        mods = modules_for(model, layers, factors_of(model, stats, layers, "aware", None if rnd is None else basis))
        out[name] = fitness(mods, "fit")
        print(f"{name:28s} KL {out[name]['kl']:.4f}  CE {out[name]['ce']:.4f}", flush=True)
    print(json.dumps({"sparsity": args.sparsity, "fit": out}))


if __name__ == "__main__":
    main()
