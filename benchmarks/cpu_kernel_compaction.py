"""The CPU kernel's compaction with and without a branch on each channel's keep decision.

Why: which channels are kept is close to random (Laplace-like activations at the median), so the
compaction's `if (kept)` mispredicts on about half of them: ~15 cycles each, ~5,600 channels per
SmolLM2 layer (q, k, v, gate, up over 576 inputs each, o over 576, down over 1536), ~0.5 ms per token.
Session 17 made it branchless (`kernels/cpu.py`: every channel is written, the count advances by the
decision). Here the kernel as it is against a copy built with session 16's branching loop, on
`cpu_kernel_rate.py`'s groups (SmolLM2-135M shapes, 30 layers, random weights, Laplace inputs, 50%
kept), alternated, 15 rounds, medians; outputs must be equal. Prints a table, ends with one JSON line;
`--out FILE` writes it. `PYTHONPATH=src python3 benchmarks/cpu_kernel_compaction.py [--out FILE]`
"""
import json
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

from cpu_kernel_rate import LAYERS, layer
from rsparse.atomic import write_json
from rsparse.kernels import cpu

ROUNDS = 15
BRANCHY = """      int64_t n = 0;
      for (int64_t j = 0; j < in; ++j) {
        const float v = xb[j];
        if (std::fabs(v) * cp[j] > t) { I[n] = (int32_t)j; C[n] = v; ++n; }
        else if (R > 0 && v != 0.f) axpy1<T>(z, a + j * R, v, R);
      }
"""


def branchy_source() -> str:
    """kernels/cpu.py's source with its compaction replaced by session 16's loop, its op renamed."""
    src = cpu._SOURCE
    start = src.index("      // branchless: which channels are kept")
    end = src.index("      for (int64_t r = 0; r < R; ++r) { C[n + r] = z[r];")
    src = src[:start] + BRANCHY + src[end:]
    return src.replace("TORCH_LIBRARY(rsparse_cpu, m)", "TORCH_LIBRARY(rsparse_cpu_branchy, m)")


def main():
    torch.manual_seed(0)
    groups = [g for _ in range(LAYERS) for g in layer()]
    ext = load_inline(name="rsparse_cpu_branchy", cpp_sources=[branchy_source()], functions=None,
                      extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"])
    empty = torch.empty(0)
    calls = []
    for g, _, x, kept, _ in groups:
        ms = g._members
        h = ext.group_new([m.wt for m in ms], [m.at for m in ms], [m.ut for m in ms], [m.col_scale for m in ms],
                          [m.tau for m in ms], [empty for _ in ms])
        calls.append((x, g._handle, h, sum(m.out_features for m in ms)))
    runs = {"branchless": lambda x, h, _, n: torch.ops.rsparse_cpu.group_run(x, h, n),
            "branchy": lambda x, _, h, n: torch.ops.rsparse_cpu_branchy.group_run(x, h, n)}
    equal = all(torch.equal(runs["branchless"](*c), runs["branchy"](*c)) for c in calls)
    times = {k: [] for k in runs}
    for _ in range(ROUNDS):
        for k, run in runs.items():
            t = time.perf_counter()
            for c in calls:
                run(*c)
            times[k].append(time.perf_counter() - t)
    nbytes = sum(k[0] for _, _, _, k, _ in groups)
    res = {k: {"ms_per_round": statistics.median(v) * 1e3, "GB_s": nbytes / statistics.median(v) / 1e9} for k, v in times.items()}
    print(f"{'compaction':11s} {'ms/round':>9s} {'GB/s':>6s}   ({len(calls)} group calls, {nbytes / 1e6:.0f} MB of kept rows)")
    for k, r in res.items():
        print(f"{k:11s} {r['ms_per_round']:9.2f} {r['GB_s']:6.1f}")
    out = {"threads": torch.get_num_threads(), "rounds": ROUNDS, "outputs_equal": equal, **res,
           "speedup": res["branchy"]["ms_per_round"] / res["branchless"]["ms_per_round"]}
    if "--out" in sys.argv:
        write_json(sys.argv[sys.argv.index("--out") + 1], out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
