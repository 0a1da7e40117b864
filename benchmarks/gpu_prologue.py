"""What the gather's compaction prologue costs per call: `_fused_gather_gemv` (each program compacts its
chunk's kept indices itself, as compiled steps run it) against `_gather_gemv` reading index lists that
were written before the timed region, i.e. the gather as it would run if the kernel that produces x
(the RMSNorm, the GLU epilogue) also wrote the lists. Also times the two-launch form (`_select` then
`_gather_gemv`) to show what a separate compaction launch costs instead.

Why: session 5's fits put a fixed ~7 µs on every call above the bytes; sessions 10-13 removed the
compaction (masked loads, 1.6x slower), deepened pipelines and held indices in registers (slower) and
never measured the prologue apart. If precomputed lists save >= 1.5 µs per call on the Llama-3-8B step
shapes (128 calls per step, ~3.2 ms), moving the compaction into the producers is worth building
(~0.2 ms per step, ~6%). Each shape at the compiled path's configuration (`config_for(reduce=False)`),
batch 1, bf16, r = 0, kept fractions 0.1..0.7, fitted time = fixed + bytes / rate per variant; every
variant checked against the float32 oracle first. Prints a table, ends with one JSON line; writes
$OUT/gpu_prologue.json. `PYTHONPATH=src python3 benchmarks/gpu_prologue.py`

Session 15 (`gpu_prologue_s15.json`): refuted. At 50% the precomputed lists were 1.8 µs *slower* in the
median (every MLP shape 1.8-7.3 µs slower; 0.6 µs faster only at 10% kept): reading one shared list
per chunk streams at 70-75% of copy where each program's private list streams at 85-93%. The fitted
fixed cost drops only 0.6-1.2 µs. The compaction prologue is not where the fixed cost is; not built.
"""
import json
import statistics

import torch
import triton

from gpu_kernels import COPIES, _write, bench, device_bandwidth, fit_fixed_cost
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.tl_common import BB
from rsparse.linear import rsparse_linear_ref

# Llama-3-8B's step shapes as the compiled step calls them (q|k|v, o, gate|up, down), then a member
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (14336, 4096)]
KEEPS = (0.1, 0.3, 0.5, 0.7)


def variants(x, wt, ones, tau, cfg):
    """{name: call(wt)} returning the float32 partials (chunks, 1, out); `pre` reads lists built here."""
    B, IN = x.shape
    OUT = wt.shape[1]
    ch = cfg["chunk"]
    nchunk, ntile = triton.cdiv(IN, ch), triton.cdiv(OUT, cfg["block_n"])
    at = torch.empty(IN, 0, device=x.device, dtype=x.dtype)
    idx = torch.empty(nchunk * ch, dtype=torch.int32, device=x.device)
    cnt = torch.empty(nchunk, dtype=torch.int32, device=x.device)
    zpart = torch.empty(1, dtype=torch.float32, device=x.device)
    ypart = torch.empty(nchunk, B, OUT, dtype=torch.float32, device=x.device)
    meta = dict(CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=cfg["block_n"], num_warps=cfg["warps"],
                num_stages=cfg["stages"])

    def select():
        tg._select[(nchunk,)](x, ones, tau, at, idx, cnt, zpart, B, IN, 0, 1, CHUNK=ch, BB=BB, RB=16, HAS_R=False)

    def gather(w):
        tg._gather_gemv[(ntile, nchunk)](x, ones, tau, w, idx, cnt, ypart, B, IN, OUT, w.stride(0), **meta)
        return ypart

    def two(w):
        select()
        return gather(w)

    select()  # the lists `pre` reads; x and tau do not change after this
    return {"fused": lambda w: tg._gather(x, w, ones, tau, ypart, cfg, OUT, OUT), "pre": gather, "select+gather": two}


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    bw = device_bandwidth()
    rows, fits = [], {}
    for out_f, in_f in SHAPES:
        Wts = [(torch.randn(in_f, out_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
        ones = torch.ones(in_f, device="cuda", dtype=dt)
        cfg = tg.config_for(out_f, 0, in_f, reduce=False)
        pts = {}
        for keep in KEEPS:
            tau = torch.quantile(x.float().abs(), 1 - keep).reshape(())
            kept = (x.float().abs() > tau).float().mean().item()
            must = 2 * kept * in_f * out_f
            ref = rsparse_linear_ref(x.float(), Wts[0].t().float(), None, tau, ones.float(),
                                     torch.empty(out_f, 0, device="cuda"), torch.empty(0, in_f, device="cuda"))
            row = {"out": out_f, "in": in_f, "kept": kept, "cfg": cfg}
            for name, call in variants(x, Wts[0], ones, tau, cfg).items():
                y = call(Wts[0]).sum(0)
                err = ((y - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (name, out_f, in_f, keep, err)
                us = bench(lambda: [call(w) for w in Wts], rep=100)
                row[f"{name}_us"] = us
                row[f"{name}_bw_frac"] = must / (us * 1e-6) / bw
                pts.setdefault(name, []).append((must, us))
            row["saved_us"] = row["fused_us"] - row["pre_us"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "cfg"}, flush=True)
        for name, p in pts.items():
            fits[f"{out_f}x{in_f} {name}"] = fit_fixed_cost(p, bw)
    print("\nshape          kept  fused us  pre us  select+gather us  saved us  fused %copy  pre %copy")
    for r in rows:
        print(f"{r['out']:>5}x{r['in']:<6} {r['kept']:5.2f} {r['fused_us']:9.2f} {r['pre_us']:7.2f} "
              f"{r['select+gather_us']:17.2f} {r['saved_us']:9.2f} {100 * r['fused_bw_frac']:11.1f} {100 * r['pre_bw_frac']:10.1f}")
    for k, f in fits.items():
        print(f"{k}: fixed {f['fixed_us']:.2f} us, streaming {f['stream_TBps']:.2f} TB/s ({100 * f['stream_frac_of_copy']:.0f}% of copy)")
    half = [r["saved_us"] for r in rows if abs(r["kept"] - 0.5) < 0.05]
    summary = {"copy_bw_TBps": bw / 1e12, "median_saved_us_at_50": statistics.median(half), "fits": fits}
    _write("gpu_prologue.json", {**summary, "rows": rows})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
