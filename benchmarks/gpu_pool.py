"""The pooled gather (`rsparse/kernels/pool.py`) against the configured gather, alone (what compiled
decode steps run), on the four calls of a Llama-3-8B block: q|k|v 6144x4096, o 4096x4096, gate|up
28672x4096, down 4096x14336. 50%, batch 1, bf16, r = 0; the configured launch parameters for both,
the pooled one with the last 1/16, 1/8 or 1/4 of every chunk pooled. Each configuration is checked
against the float32 oracle first (the sum of its partials), then timed like `gpu_kernels.py` (weight
copies in one CUDA graph, so weights come from HBM).

Prediction (docs/perf-gpu.md, session 19): if the pool halves the tail (7.4 µs of gate|up's 34.5,
4.0 of down's 20.4 in session 16's timeline), gate|up ~3 µs and down ~1.5 µs faster per call; no gain
on q|k|v and o, whose tails are ~1.7 µs.
Prints a table, ends with one JSON line, writes $OUT/gpu_pool.json.
`PYTHONPATH=src python3 benchmarks/gpu_pool.py`
"""
import json

import torch
import triton

from gpu_kernels import _case50, _write, time_grid
from rsparse.gpubench import copy_bandwidth
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.pool import pooled_partials
from rsparse.linear import rsparse_linear_ref

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
FRACTIONS = (16, 8, 4)  # pool = chunk / F


def main():
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for out_f, in_f in SHAPES:
        Ws, Wts, x, ones, tau, at, u = _case50(out_f, in_f, 1)
        ref = rsparse_linear_ref(x.float(), Ws[0].float(), None, tau, ones.float(), u.float(), at.t().float())
        cfg = tg.config_for(out_f, 0, in_f, reduce=False)
        ch = cfg["chunk"]
        nchunk = triton.cdiv(in_f, ch)
        kept = ((x[0].float().abs() > tau).sum() / in_f).item()
        cands = [None] + [ch // f for f in FRACTIONS]
        parts = {p: torch.empty((1 if p is None else 2) * nchunk, 1, out_f, device="cuda") for p in cands}

        def call(pool, Wt):
            if pool is None:
                return tg._gather(x, Wt, ones, tau, parts[None], cfg, out_f, out_f)
            return pooled_partials(x, Wt, ones, tau, cfg, pool, counter, ypart=parts[pool])

        times = time_grid(cands, call, ref, Wts, rep=100, tag=f"{out_f}x{in_f}", result=lambda p: p.sum(0))
        assert counter.item() == 0, "the pooled gather left its counter set"
        floor_us = 2 * out_f * in_f * kept / bw * 1e6
        row = {"shape": f"{out_f}x{in_f}", "chunk": ch, "block_n": cfg["block_n"], "kept": kept, "floor_us": floor_us,
               "configured_us": times.get(0)}
        for i, p in enumerate(cands[1:], 1):
            row[f"pool_{p}_us"] = times.get(i)
        rows.append(row)
        cells = "  ".join(f"pool {p}: {row[f'pool_{p}_us']:.2f}" if row[f"pool_{p}_us"] else f"pool {p}: -" for p in cands[1:])
        base = f"{row['configured_us']:.2f}" if row["configured_us"] else "-"
        print(f"{row['shape']:>11}  chunk {ch:5d}  floor {floor_us:6.2f} us  configured {base}  {cells}", flush=True)
    out = {"copy_bw_TBps": bw / 1e12, "rows": rows}
    _write("gpu_pool.json", out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
