"""At what rate does the CPU kernel stream, with every row kept and with half, against MKL's GEMV?

Why: in the compiled 50% step the C++ kernel reads ~190 MB of kept rows per token at 13-17 GB/s where
MKL's GEMV reaches ~24 GB/s on this host (docs/perf-cpu.md, session 16). Two explanations predict
different things: if the kernel's loop or its threading is the limit, it is slow with every row kept
too (rows then follow each other in memory, as in a GEMV); if the scattered rows are (short bursts,
each a new stream for the prefetcher), it is fast with every row kept and slow at half.

Here SmolLM2-135M's decode shapes (per layer: q|k|v 960x576, o 576x576, gate|up 3072x576, down
576x1536, float32, 30 layers of their own weights: 425 MB, far beyond the 48 MB L3), random weights and
Laplace inputs, one token's worth of calls per round, 2 threads. Per round, alternated: MKL's GEMV on
every dense weight (`torch.mv`, (out, in) row-major), the kernel with every channel kept (tau = 0),
and the kernel at 50% kept (tau = the median |x| c). GB/s = bytes of weight rows read / time. Prints a
table, ends with one JSON line; `--out FILE` writes it.
`PYTHONPATH=src python3 benchmarks/cpu_kernel_rate.py [--out FILE]`
"""
import json
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

from rsparse.atomic import write_json
from rsparse.kernels import cpu
from rsparse.kernels.cpu import CpuGroup, CpuRSparseLinear
from rsparse.linear import RSparseLinear

ROUNDS, LAYERS = 15, 30
SHAPES = {"qkv": [(576, 576), (192, 576), (192, 576)], "o": [(576, 576)], "gate_up": [(1536, 576), (1536, 576)],
          "down": [(576, 1536)]}


def alternate(runs: dict, rounds: int, nbytes) -> dict:
    """Each of `runs` (name: a function of no arguments) timed once per round, in turn, for `rounds`
    rounds; {name: {"ms": median ms, "MB": bytes / 1e6, "GB_s": bytes / median}}, where `nbytes` is
    the bytes one call of a run reads (a number, or {name: number})."""
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    out = {}
    for k, v in times.items():
        b = nbytes[k] if isinstance(nbytes, dict) else nbytes
        out[k] = {"ms": statistics.median(v) * 1e3, "MB": b / 1e6, "GB_s": b / statistics.median(v) / 1e9}
    return out


def build_variant(source: str, name: str):
    """A copy of the C++ kernel built from `source` (kernels/cpu.py's `_SOURCE` with a change) under its
    own extension and op namespace `name` (`torch.ops.<name>.group_run`), with the kernel's own flags."""
    assert "TORCH_LIBRARY(rsparse_cpu, m)" in source
    return load_inline(name=name, cpp_sources=[source.replace("TORCH_LIBRARY(rsparse_cpu, m)", f"TORCH_LIBRARY({name}, m)")],
                       functions=None, extra_cflags=cpu.CFLAGS)


def report(label: str, res: dict, note: str, out: dict) -> None:
    """Print `alternate`'s result as a table (one row per run), then `out` as one JSON line; with
    `--out FILE` on the command line, write `out` there too."""
    print(f"{label:18s} {'ms/round':>9s} {'MB':>6s} {'GB/s':>6s}   ({note})")
    for k, r in res.items():
        print(f"{k:18s} {r['ms']:9.2f} {r['MB']:6.0f} {r['GB_s']:6.1f}")
    if "--out" in sys.argv:
        write_json(sys.argv[sys.argv.index("--out") + 1], out)
    print(json.dumps(out))


def set_half_kept(ref: RSparseLinear, x: torch.Tensor) -> RSparseLinear:
    """ref with tau at the median score of input row x[0]: half its channels kept."""
    ref.tau.fill_((x[0].abs() * ref.col_scale).median().item())
    return ref


def kept_bytes(members, x: torch.Tensor) -> int:
    """Bytes of float32 weight rows the members keep for input row x[0]."""
    return 4 * sum(int((x[0].abs() * m.col_scale > m.tau).sum()) * m.out_features for m in members)


def check_masked(group: CpuGroup, x: torch.Tensor, weights) -> None:
    """The kernel's own check: the group's output equals each member's masked dense product."""
    want = torch.cat([torch.nn.functional.linear(x * (x.abs() * m.col_scale > m.tau), w) for m, w in zip(group._members, weights)], -1)
    assert torch.allclose(torch.cat(group(x), -1), want, rtol=1e-4, atol=1e-4)


def layer():
    """One layer's groups: [(group at 50% kept, group with every channel kept, input row, bytes of the
    rows each reads, dense weights)]; the two groups hold copies of the same weights."""
    out = []
    for shapes in SHAPES.values():
        lins = [torch.nn.Linear(i, o, bias=False) for o, i in shapes]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, shapes[0][1]))
        half, full = [], []
        for lin in lins:
            ref = RSparseLinear.from_linear(lin, 0.0, "wnorm")
            full.append(CpuRSparseLinear(ref))  # tau = 0: every nonzero channel kept
            half.append(CpuRSparseLinear(set_half_kept(ref, x)))
        kept = [kept_bytes(ms, x) for ms in (half, full)]
        out.append((CpuGroup(half), CpuGroup(full), x, kept, [lin.weight.detach().contiguous() for lin in lins]))
    return out


def main():
    torch.manual_seed(0)
    groups = [g for _ in range(LAYERS) for g in layer()]
    with torch.inference_mode():
        for g in groups[0][:2]:
            check_masked(g, groups[0][2], groups[0][4])
    runs = {"mkl_gemv": lambda: [torch.mv(w, x[0]) for _, _, x, _, ws in groups for w in ws],
            "kernel_all_kept": lambda: [g(x) for _, g, x, _, _ in groups],
            "kernel_half_kept": lambda: [g(x) for g, _, x, _, _ in groups]}
    nbytes = {"mkl_gemv": 4 * sum(w.numel() for *_, ws in groups for w in ws),
              "kernel_all_kept": sum(k[1] for _, _, _, k, _ in groups), "kernel_half_kept": sum(k[0] for _, _, _, k, _ in groups)}
    with torch.inference_mode():
        res = alternate(runs, ROUNDS, nbytes)
    report("path", res, f"{len(groups)} groups per round, {torch.get_num_threads()} threads",
           {"threads": torch.get_num_threads(), "rounds": ROUNDS, "layers": LAYERS, **res})


if __name__ == "__main__":
    main()
