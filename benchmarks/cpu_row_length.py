"""Does the CPU kernel pay per kept row, beyond the row's bytes? (session 22's open question)

Why: half kept, the kernel streams its rows at 13-17 GB/s where MKL's GEMV reaches ~20-24 on this host
(docs/perf-cpu.md, sessions 16-17), and halving the arithmetic (bf16 pair dots, session 22) changed
nothing: the hypothesis left is a cost per row (a new stream for the prefetcher, the row's address
chain). SmolLM2-135M's kept rows are short: 576 floats (q, o, down: 44% of the bytes), 1536 (gate,
up: 50%), 192 (k, v: 6%). If the cost is per row, storing a group's members side by side per channel
(q|k|v: 960 floats, gate|up: 3072) would make most kept rows one longer burst.

Test: modules of equal bytes (MB_PER_MODULE of float32 weights each, MODULES of them: far beyond the
32 MB L3) whose kept rows are L floats long (out = L, in = bytes / 4L), half the channels kept
(tau = the median score), one call each per round; the same number of calls at every L, so the
per-call cost is the same and only the number of rows changes (2x the rows at half the length). MKL's
GEMV on the same dense weights (every row) beside it. Alternated per round, medians. Prints a table,
ends with one JSON line; `--out FILE` writes it.
`PYTHONPATH=src:benchmarks python3 benchmarks/cpu_row_length.py [--out FILE]`
"""
import torch

from cpu_kernel_rate import alternate, check_masked, kept_bytes, report, set_half_kept
from rsparse.kernels.cpu import CpuGroup, CpuRSparseLinear
from rsparse.linear import RSparseLinear

LENGTHS = (192, 576, 960, 1536, 3072)
MODULES, MB_PER_MODULE, ROUNDS = 40, 10, 15


def modules(length: int):
    """MODULES single-member groups with kept rows of `length` floats, half kept: [(group, x, W)] and
    the bytes of kept rows per round."""
    in_f = MB_PER_MODULE * 10**6 // (4 * length)
    out, kept = [], 0
    for _ in range(MODULES):
        lin = torch.nn.Linear(in_f, length, bias=False)
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f))
        m = CpuRSparseLinear(set_half_kept(RSparseLinear.from_linear(lin, 0.0, "wnorm"), x))
        kept += kept_bytes([m], x)
        out.append((CpuGroup([m]), x, lin.weight.detach().contiguous()))
    return out, kept


def main():
    torch.manual_seed(0)
    runs, nbytes = {}, {}
    with torch.inference_mode():
        for length in LENGTHS:
            mods, kept = modules(length)
            g, x, w = mods[0]
            check_masked(g, x, [w])
            runs[f"kernel_L{length}"] = lambda mods=mods: [g(x) for g, x, _ in mods]
            runs[f"mkl_L{length}"] = lambda mods=mods: [torch.mv(w, x[0]) for _, x, w in mods]
            nbytes[f"kernel_L{length}"] = kept
            nbytes[f"mkl_L{length}"] = 4 * sum(w.numel() for *_, w in mods)
        res = alternate(runs, ROUNDS, nbytes)
    report("path", res, f"{MODULES} modules of {MB_PER_MODULE} MB per length, half kept, {torch.get_num_threads()} threads",
           {"threads": torch.get_num_threads(), "rounds": ROUNDS, "modules": MODULES, "mb_per_module": MB_PER_MODULE, **res})


if __name__ == "__main__":
    main()
