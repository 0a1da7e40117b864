"""How many channels do B decode rows keep together on a real model? The Triton modules decide how
many rows run on the gather kernels from the independence estimate 1 - (1 - keep)^B of the union of
kept channels (`rsparse.kernels.module.kernel_rows`); this measures the real union on SmolLM2-135M.

Each projection's input is recorded on held-out Wikipedia windows (one forward pass, float32); its
threshold keeps the fraction `keep` of channels by the R-Sparse score |x_j| ||W[:, j]||; a batch of B
rows takes the token at one position from B different windows (B sequences decoded together) and
keeps the union of their channels. Prints a table (mean over projections and positions of the real
union against the estimate) and ends with one JSON line; writes benchmarks/results/batch_union.json.
"""
import json
import os
import sys

import torch

import rsparse
from rsparse.atomic import write_json
from rsparse.data import token_windows
from rsparse.families import locate
from rsparse.linear import column_norms

KEEPS = (0.3, 0.5, 0.7)
BATCHES = (1, 2, 4, 8)


def main(n_windows: int = 16, length: int = 128) -> dict:
    torch.manual_seed(0)
    model, tok = rsparse.load()
    ids = token_windows(tok, "wiki", "eval", length, n=n_windows, seed=0)
    projs = locate(model)
    inputs, hooks = {}, []
    for k, m in projs.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, k=k: inputs.__setitem__(k, a[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    rows = []
    for keep in KEEPS:
        real = {B: [] for B in BATCHES}
        for k, x in inputs.items():  # x: (windows, positions, in)
            score = x.abs() * column_norms(projs[k].weight)
            tau = torch.quantile(score.reshape(-1)[:: max(1, score.numel() // 2**20)], 1 - keep)
            kept = score > tau
            for B in BATCHES:  # windows [0, B), [B, 2B), ...: B sequences at the same position
                groups = kept[: n_windows // B * B].reshape(n_windows // B, B, *kept.shape[1:])
                real[B].append(groups.any(1).float().mean().item())
        for B in BATCHES:
            rows.append({"keep": keep, "batch": B, "union_real": sum(real[B]) / len(real[B]),
                         "union_real_max": max(real[B]), "union_independent": 1 - (1 - keep) ** B})
    print(f"{'keep':>5s} {'B':>2s} {'union real':>10s} {'max layer':>9s} {'independent':>11s}")
    for r in rows:
        print(f"{r['keep']:5.2f} {r['batch']:2d} {r['union_real']:10.3f} {r['union_real_max']:9.3f} {r['union_independent']:11.3f}")
    result = {"model": "smollm2-135m", "windows": n_windows, "length": length, "rows": rows}
    write_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "batch_union.json"), result)
    print(json.dumps({f"k{r['keep']}_b{r['batch']}": round(r["union_real"], 3) for r in rows}))
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
