"""Is 85% of copy bandwidth per MLP gather out of reach for the method, or for Triton's programs?

Times, per Llama-3-8B / Llama-2-7B projection shape, bf16, batch 1, 50% of channels kept by |x| c > tau
(Laplace activations, as `gpu_kernels.py`), each inside one CUDA graph over 4 weight copies
(`gpu_kernels.bench`), medians in µs:
- "dense": cuBLAS on the whole weight; "dense half": cuBLAS on a contiguous weight of the same bytes
  the sparse call must read (out x in/2): what a plain read of those bytes costs as one call;
- "triton": our eager op (`rsparse_gemv`), and "triton gather": the gather alone (`rsparse_partials`,
  what a compiled step runs);
- "cuda cfg k": the gather written in CUDA C++ (`benchmarks/cuda_gather.cu`: ballot compaction inside
  each warp, no index list, small self-balancing blocks), alone and with its partial-sum kernel.
`--ceiling`: instead, the plainest one-call read of the same byte counts (`rs_read`: 16-byte streaming
loads, 2-16 blocks per SM, 8 in flight per thread; with `--gemv` also 4, and inductor's tuned GEMV on the
"dense half" weights), against larger reads (235 MB, 1 GiB): what any single kernel reading that many
bytes reaches.
Every CUDA configuration is first checked against the float32 oracle (`rsparse_linear_ref`); a wrong one
is reported and skipped. BW = the kept rows' bytes / time / copy bandwidth measured in the same run.
Prints a table and one JSON line; writes $OUT/gpu_cuda_gather.json. Needs nvcc (the H200 image has it).
"""
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_kernels import COPIES, bench, device_bandwidth
from rsparse.atomic import write_json
from rsparse.kernels import triton_gemv as tg
from rsparse.linear import rsparse_linear_ref

SHAPES = [(14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008), (28672, 4096), (4096, 4096), (1024, 4096)]
# (NW warps, V 16-byte pieces per lane per row: tile V * 256 columns, GPW 32-channel groups per warp, U rows in flight)
CFGS = {0: (8, 2, 2, 8), 1: (4, 2, 1, 8), 2: (8, 1, 1, 8), 3: (4, 2, 2, 8), 4: (8, 2, 1, 8), 5: (4, 1, 2, 16),
        6: (8, 2, 4, 8), 7: (4, 4, 1, 4)}
DECL = """
torch::Tensor gather(torch::Tensor x, torch::Tensor c, torch::Tensor tau, torch::Tensor wt, int64_t cfg, int64_t smem);
torch::Tensor reduce(torch::Tensor part);
torch::Tensor read_bytes(torch::Tensor buf, int64_t blocks, int64_t unr);
"""


def build():
    from torch.utils.cpp_extension import load_inline

    src = (Path(__file__).parent / "cuda_gather.cu").read_text()
    return load_inline(name="rs_cuda_gather", cpp_sources=DECL, cuda_sources=src, functions=["gather", "reduce", "read_bytes"],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"], verbose=False)


def rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def shape_rows(ext, out_f, in_f, bw, keep_frac):
    dt = torch.bfloat16
    Ws = [(torch.randn(out_f, in_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
    Wts = [W.t().contiguous() for W in Ws]
    halves = [W[:, : in_f // 2].contiguous() for W in Ws]
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
    ones = torch.ones(in_f, device="cuda", dtype=dt)
    tau = torch.quantile(x[0].float().abs(), 1 - keep_frac).reshape(()).float()
    at, u = torch.empty(in_f, 0, device="cuda", dtype=dt), torch.empty(out_f, 0, device="cuda", dtype=dt)
    ref = rsparse_linear_ref(x.float(), Ws[0].float(), None, tau, ones.float(), u.float(), at.t().float())[0]
    kept = ((x[0].float().abs() > tau).sum() / in_f).item()
    must = 2 * out_f * in_f * kept
    lk = tg.tile_locks(out_f, "cuda")
    row = {"out": out_f, "in": in_f, "kept": kept, "floor_us": must / bw * 1e6}
    row["dense_us"] = bench(lambda: [F.linear(x, W) for W in Ws])
    row["dense_half_us"] = bench(lambda: [F.linear(x[:, : in_f // 2], H) for H in halves])
    y = tg.rsparse_gemv(x, Wts[0], at, u, ones, tau, lk)
    assert rel(y[0], ref) < 1e-2, ("triton", out_f, in_f)
    row["triton_us"] = bench(lambda: [tg.rsparse_gemv(x, Wt, at, u, ones, tau, lk) for Wt in Wts])
    parts = lambda Wt: torch.ops.rsparse.rsparse_partials(x, Wt, at, u, ones, tau, lk, out_f, out_f, 0, 0)  # noqa: E731
    assert rel(parts(Wts[0]).sum(0)[0], ref) < 1e-2, ("triton gather", out_f, in_f)
    row["triton_gather_us"] = bench(lambda: [parts(Wt) for Wt in Wts])
    x1 = x[0].contiguous()
    for k in CFGS:
        try:
            err = rel(ext.reduce(ext.gather(x1, ones, tau, Wts[0], k, 0)), ref)
        except RuntimeError as e:  # a configuration that fails to launch must not cost the table
            row[f"cuda{k}_error"] = str(e)[:200]
            continue
        if not err < 1e-2:
            row[f"cuda{k}_error"] = f"wrong result: relative error {err:.3g}"
            continue
        row[f"cuda{k}_gather_us"] = bench(lambda: [ext.gather(x1, ones, tau, Wt, k, 0) for Wt in Wts])
        row[f"cuda{k}_us"] = bench(lambda: [ext.reduce(ext.gather(x1, ones, tau, Wt, k, 0)) for Wt in Wts])
        row[f"cuda{k}_err"] = err
    for key in [k for k in row if k.endswith("_us") and k not in ("floor_us", "dense_us")]:
        row[key.replace("_us", "_bw")] = row["floor_us"] / row[key]
    return row


def ceiling(ext, bw):
    """Best one-call read of each byte count (µs, share of copy bandwidth), and inductor's GEMV on the
    contiguous weights of the MLP shapes' kept bytes."""
    from gpu_kernels import dense_gemv_us

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for label, nbytes in [("4096x4096", 2 * 4096 * 2048), ("11008x4096", 2 * 11008 * 2048), ("14336x4096", 2 * 14336 * 2048),
                          ("28672x4096", 2 * 28672 * 2048), ("235 MB", 2 * 28672 * 4096), ("1 GiB", 2**30)]:
        bufs = [torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16) for _ in range(COPIES)]
        ref = sum(ext.read_bytes(bufs[0], b, 8).sum().item() for b in (sms,))  # the read's sum must not depend on its grid
        row = {"what": label, "bytes": nbytes, "floor_us": nbytes / bw * 1e6}
        for per_sm in (2, 4, 8, 16):
            for unr in (4, 8) if "--gemv" in sys.argv else (8,):
                got = ext.read_bytes(bufs[0], per_sm * sms, unr).sum().item()
                assert abs(got - ref) <= 1e-2 * max(1.0, abs(ref)), (label, per_sm, unr, got, ref)
                row[f"read_{per_sm}x{unr}_us"] = bench(lambda: [ext.read_bytes(b, per_sm * sms, unr) for b in bufs])
        best = min((k for k in row if k.startswith("read_")), key=row.get)
        row.update(best_read=best, best_read_us=row[best], best_read_bw=row["floor_us"] / row[best])
        bufs.clear()
        if "--gemv" in sys.argv and "x" in label and label != "4096x4096":
            out_f, in_f = map(int, label.split("x"))
            halves = [(torch.randn(out_f, in_f // 2, device="cuda") / in_f**0.5).to(torch.bfloat16) for _ in range(COPIES)]
            x = torch.randn(1, in_f // 2, device="cuda").to(torch.bfloat16)
            us, err = dense_gemv_us(x, halves)
            row.update(gemv_half_us=us, gemv_half_bw=row["floor_us"] / us if us else None, gemv_half_error=err)
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print(f"\none-call reads, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'bytes of':>12s} {'MB':>7s} {'floor us':>9s} {'best read us':>13s} {'share':>6s} {'gemv half us':>13s} {'share':>6s}")
    for r in rows:
        g = r.get("gemv_half_us")
        print(f"{r['what']:>12s} {r['bytes'] / 1e6:7.1f} {r['floor_us']:9.2f} {r['best_read_us']:13.2f} {r['best_read_bw']:6.0%} "
              + (f"{g:13.2f} {r['gemv_half_bw']:6.0%}" if g else f"{'-':>13s} {'-':>6s}"))
    summary = {"copy_bw_TBps": bw / 1e12, "rows": rows}
    if os.environ.get("OUT"):
        write_json(Path(os.environ["OUT"]) / "gpu_read_ceiling.json", summary)
    print(__import__("json").dumps({"copy_bw_TBps": bw / 1e12, "best_read_bw": {r["what"]: r["best_read_bw"] for r in rows}}))


def main():
    torch.manual_seed(0)
    bw = device_bandwidth()
    ext = build()
    if "--ceiling" in sys.argv:
        return ceiling(ext, bw)
    keep = float(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv[:-1] else 0.5
    rows = []
    for out_f, in_f in SHAPES:
        row = shape_rows(ext, out_f, in_f, bw, keep)
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    cols = ["dense", "dense_half", "triton", "triton_gather"] + [f"cuda{k}" for k in CFGS]
    print(f"\nµs (share of copy bandwidth on the kept bytes); copy bandwidth {bw / 1e12:.2f} TB/s, kept {keep}")
    print(f"{'out x in':>12s} {'floor':>6s} " + " ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            t = r.get(f"{c}_us")
            cells.append(f"{t:6.2f} ({r[c + '_bw']:4.0%})" if t is not None and c != "dense" else
                         (f"{t:14.2f}" if t is not None else f"{'-':>14s}"))
        print(f"{r['out']:>5d}x{r['in']:<6d} {r['floor_us']:6.2f} " + " ".join(f"{c:>14s}" for c in cells))
    best = {}
    for r in rows:
        k = min((k for k in CFGS if f"cuda{k}_us" in r), key=lambda k: r[f"cuda{k}_us"], default=None)
        if k is not None:
            best[f"{r['out']}x{r['in']}"] = {"cfg": k, "us": r[f"cuda{k}_us"], "bw": r[f"cuda{k}_bw"],
                                             "triton_us": r["triton_us"], "triton_bw": r["triton_bw"]}
    mlp = [v["bw"] for s, v in best.items() if s not in ("4096x4096", "1024x4096")]
    summary = {"copy_bw_TBps": bw / 1e12, "keep": keep, "cfgs": CFGS, "best_cuda": best,
               "median_best_cuda_bw_mlp": statistics.median(mlp) if mlp else None, "rows": rows}
    if os.environ.get("OUT"):
        write_json(Path(os.environ["OUT"]) / "gpu_cuda_gather.json", summary)
    print(__import__("json").dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
