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
import torch

from cpu_kernel_rate import LAYERS, alternate, build_variant, layer, report
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
    """kernels/cpu.py's source with its compaction replaced by session 16's loop."""
    src = cpu._SOURCE
    start = src.index("      // branchless: which channels are kept")
    end = src.index("      for (int64_t r = 0; r < R; ++r) { C[n + r] = z[r];")
    return src[:start] + BRANCHY + src[end:]


def main():
    torch.manual_seed(0)
    groups = [g for _ in range(LAYERS) for g in layer()]
    ext = build_variant(branchy_source(), "rsparse_cpu_branchy")
    empty = torch.empty(0)
    calls = []
    for g, _, x, kept, _ in groups:
        ms = g._members
        h = ext.group_new([m.wt for m in ms], [m.at for m in ms], [m.ut for m in ms], [m.col_scale for m in ms],
                          [m.tau for m in ms], [empty for _ in ms])
        calls.append((x, g._handle, h, sum(m.out_features for m in ms)))
    ops = {"branchless": lambda x, h, _, n: torch.ops.rsparse_cpu.group_run(x, h, n),
           "branchy": lambda x, _, h, n: torch.ops.rsparse_cpu_branchy.group_run(x, h, n)}
    equal = all(torch.equal(ops["branchless"](*c), ops["branchy"](*c)) for c in calls)
    nbytes = sum(k[0] for _, _, _, k, _ in groups)
    res = alternate({k: (lambda op=op: [op(*c) for c in calls]) for k, op in ops.items()}, ROUNDS, nbytes)
    report("compaction", res, f"{len(calls)} group calls, {nbytes / 1e6:.0f} MB of kept rows",
           {"threads": torch.get_num_threads(), "rounds": ROUNDS, "outputs_equal": equal, **res,
            "speedup": res["branchy"]["ms"] / res["branchless"]["ms"]})

if __name__ == "__main__":
    main()
