"""Does VDPBF16PS make the bf16 CPU kernel faster?

Why: session 21 found our kernel no faster in bf16 than in float32 (compiled 50% step 68.7-71.2
against 70.8 tok/s) although it reads half the bytes. The hypothesis: on 2 cores the kernel is bound
by instructions, not bytes: the compiler's loop converts every bf16 weight to float32 (a widening
move and a shift per 16 values) before its FMA. `axpy8_dp` multiplies pairs of bf16 rows by a pair of
bf16 inputs in one VDPBF16PS, with no conversion (the input rows of a bf16 model are bf16 values, so
nothing is rounded); about half the instructions per weight.

Here SmolLM2-135M's decode shapes (per layer q|k|v 960x576, o 576x576, gate|up 3072x576, down
576x1536; 30 layers of their own random weights, bf16: 213 MB, beyond the L3), Laplace inputs rounded
to bf16, 50% kept, rank 0, one token's worth of calls per round, 2 threads, alternated per round:
the kernel with the pair-dot path (`set_dpbf16(True)`), the same groups with it off (the conversion
loop), and PyTorch's bf16 GEMV on the dense weights for reference. GB/s = weight bytes read / time.
Prints a table, ends with one JSON line; `--out FILE` writes it.
`PYTHONPATH=src:benchmarks python3 benchmarks/cpu_kernel_dpbf16.py [--out FILE]`
"""
import sys

import torch

from cpu_kernel_rate import LAYERS, ROUNDS, SHAPES, alternate, report
from rsparse.kernels.cpu import CpuGroup, CpuRSparseLinear, extension
from rsparse.linear import RSparseLinear


def layer():
    """One layer's groups at 50% kept, bf16: [(group, input row (bf16), bytes of kept rows, dense weights)]."""
    out = []
    for shapes in SHAPES.values():
        lins = [torch.nn.Linear(i, o, bias=False) for o, i in shapes]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, shapes[0][1])).bfloat16()
        mods = []
        for lin in lins:
            ref = RSparseLinear.from_linear(lin, 0.0, "wnorm")
            ref.tau.fill_((x[0].float().abs() * ref.col_scale).median().item())
            mods.append(CpuRSparseLinear(ref, torch.bfloat16))
        kept = 2 * sum(int((x[0].float().abs() * m.col_scale > m.tau).sum()) * m.out_features for m in mods)
        out.append((CpuGroup(mods), x, kept, [lin.weight.detach().bfloat16().contiguous() for lin in lins]))
    return out


def main():
    ext = extension()
    if not ext.has_dpbf16():
        sys.exit("this CPU (or compiler) has no AVX512-BF16: the kernel has no pair-dot path here")
    torch.manual_seed(0)
    groups = [g for _ in range(LAYERS) for g in layer()]

    def kernel(on: bool):
        def run():
            was = ext.set_dpbf16(on)
            try:
                return [g(x) for g, x, _, _ in groups]
            finally:
                ext.set_dpbf16(was)
        return run

    with torch.inference_mode():  # both paths give the same outputs first
        a, b = kernel(True)(), kernel(False)()
        for ga, gb in zip(a[:8], b[:8]):
            for ya, yb in zip(ga, gb):
                assert torch.allclose(ya.float(), yb.float(), rtol=1e-2, atol=1e-2), (ya - yb).abs().max()
        runs = {"pair_dot": kernel(True), "convert": kernel(False),
                "torch_bf16_gemv": lambda: [torch.mv(w, x[0]) for _, x, _, ws in groups for w in ws]}
        kept = sum(k for _, _, k, _ in groups)
        nbytes = {"pair_dot": kept, "convert": kept, "torch_bf16_gemv": 2 * sum(w.numel() for *_, ws in groups for w in ws)}
        res = alternate(runs, ROUNDS, nbytes)
    ratio = res["convert"]["ms"] / res["pair_dot"]["ms"]
    report("path (bf16, 50%)", res, f"{len(groups)} groups per round, {torch.get_num_threads()} threads; "
           f"pair_dot {ratio:.2f}x convert",
           {"threads": torch.get_num_threads(), "rounds": ROUNDS, "layers": LAYERS, "pair_dot_speedup": ratio, **res})


if __name__ == "__main__":
    main()
