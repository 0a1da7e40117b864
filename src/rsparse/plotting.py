"""Plan heatmaps: per projection (rows q..down) and block (columns), the byte sparsity
s_p = 1 - (kappa * in * out + r * (in + out)) / (in * out) and the split
alpha_p = kappa * in * out / (kappa * in * out + r * (in + out)) (1 where no rank is used)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .families import PROJECTIONS


def plan_grid(plan) -> tuple[np.ndarray, np.ndarray]:
    """[7, n_blocks] arrays of sparsity and alpha of a plan (dense projections: s = 0, alpha = 1)."""
    n_blocks = 1 + max(int(k.split(".")[0]) for k in plan.shapes)
    s = np.zeros((len(PROJECTIONS), n_blocks))
    a = np.ones_like(s)
    for key, (o, i) in plan.shapes.items():
        b, p = key.split(".")
        row, col = PROJECTIONS.index(p), int(b)
        lp = plan.layers.get(key)
        if lp is None and p in ("up", "down") and f"{b}.act" in plan.layers:  # cats skips up rows / down columns
            s[row, col] = 1.0 - plan.layers[f"{b}.act"].keep
        elif lp is not None:
            cols = lp.keep * o * i
            read = cols + lp.rank * (o + i)
            s[row, col] = 1.0 - read / (o * i)
            a[row, col] = cols / read if read > 0 else 1.0
    return s, a


def plot_plan(plan, out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, a = plan_grid(plan)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.32 * s.shape[1] + 2), 5.6), sharex=True)
    title = (f"{plan.model_id}: {plan.config['method']}/{plan.config['allocation']}, "
             f"target {plan.config['sparsity']:.2f}, expected {plan.expected_sparsity():.3f}")
    for ax, grid, name, cmap, lim in ((axes[0], s, "sparsity", "viridis", (0, 1)), (axes[1], a, "alpha", "magma", (min(0.5, a.min()), 1))):
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest")
        ax.set_yticks(range(len(PROJECTIONS)), PROJECTIONS)
        ax.set_ylabel(name)
        fig.colorbar(im, ax=ax, fraction=0.025)
    axes[1].set_xlabel("block")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
