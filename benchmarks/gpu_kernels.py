"""Kernel-level GPU benchmark: dense cuBLAS vs a TEAL-style masked split-K kernel vs ours, per
projection shape of 7-8B models, bf16 (the main table in fp16 with `--dtype float16`; the other modes
stay bf16), batch 1 (ours also at batch 2/4/8 and with a rank term).
Also the dense product as inductor computes it with coordinate-descent tuning ("gemv us",
`dense_gemv_us`; added in session 16, when it made the whole dense step 15% faster than cuBLAS), and
our speedup against the faster of the two dense products (`speedup_vs_best_dense`; session 35: 1.16-1.47x on the MLP shapes).

Weights are random N(0, 1/in), activations Laplace-distributed (heavy-tailed, like real hidden
states); tau is set so that the requested fraction of channels is dropped. Each timed call cycles
through 4 weight copies inside one CUDA graph (triton.testing.do_bench_cudagraph) so weights come
from HBM, not L2; medians are reported. Every configuration is first checked against the eager
float32 oracle. Prints a table, ends with one JSON line; writes $OUT/gpu_kernels.json if OUT is set.
`--tune` first grid-searches launch configurations of both kernels per shape; `--variants dot|waves`
compares grids of launch configurations with v2 and writes the best per shape;
`--groups` times q|k|v and gate|up fused into one launch pair against the members one by one;
`--splitk` times the one-launch v7 kernel's configurations against v5, TEAL-style and dense;
`--shapes OUTxIN,...` replaces the main table's shapes; `--fixed-cost` fits time = fixed + bytes / bandwidth per kernel over kept fractions 0.02..0.9.
Rows without rank terms also time the gathers alone, as compiled steps run them: Triton's and, where nvcc
builds it, the CUDA C++ one at batch 1 (`kernels/cuda_gather.py`; "triton_gather_us", "cuda_gather_us", and
"cuda_gather_kc4_us" with 4 chunks of 256 channels per block).
(`benchmarks/gpu_gather_grid.py` grid-searches the gather alone, as compiled steps run it, on 22 shapes.)
"""
import json
import os
import statistics
import sys

import torch
import triton
import triton.testing

from rsparse.errors import RSparseError
from rsparse.gpubench import copy_bandwidth, gpu_dtype
from rsparse.budget import allocate
from rsparse.kernels.module import RANK_ALIGN
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.teal import teal_gemv
from rsparse.kernels.triton_gemv import rsparse_gemv
from rsparse.linear import rsparse_linear_ref

TUNE = "--tune" in sys.argv  # grid-search launch configurations first (about 8 minutes)
# --dtype float16: the main table in fp16 (weights, activations, outputs; bfloat16 by default)
DTYPE = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv[:-1] else "bfloat16"
# best TEAL-style configurations on an H200: --tune (2026-11-28), then --teal-sweep (deeper K steps and 4
# stages; session 6 on the first four shapes, session 8 on the other three: 1.04-2.0x faster than the
# --tune ones); ours use config_for
TEAL_BEST = {(4096, 4096): dict(split_k=16, block_n=128, block_k=128, stages=4),
             (1024, 4096): dict(split_k=16, block_n=128, block_k=128, stages=4),
             (14336, 4096): dict(split_k=16, block_n=256, block_k=128, stages=4),
             (4096, 14336): dict(split_k=16, block_n=128, block_k=128, stages=4),
             (11008, 4096): dict(split_k=16, block_n=256, block_k=128, stages=4),
             (4096, 11008): dict(split_k=16, block_n=128, block_k=128, stages=4)}
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]  # (out, in)
if "--shapes" in sys.argv[:-1]:  # e.g. --shapes 128256x4096 (Llama-3-8B's lm_head, session 41)
    SHAPES = [tuple(int(v) for v in s.split("x")) for s in sys.argv[sys.argv.index("--shapes") + 1].split(",")]
# the gather configurations before session 12's 128-row K steps (TUNED then): the "s11 cfg" column
# times every call on them too, side by side (calls on the one-launch kernel, unchanged, are skipped)
S11 = {(4096, 4096): dict(chunk=512, block_k=64, block_n=128, warps=4, stages=3, fused=True),
       (1024, 4096): dict(chunk=512, block_k=64, block_n=128, warps=4, stages=4, fused=True),
       (14336, 4096): dict(chunk=1024, block_k=64, block_n=128, warps=4, stages=4, fused=True),
       (4096, 14336): dict(chunk=1024, block_k=64, block_n=128, warps=4, stages=3, fused=True),
       (11008, 4096): dict(chunk=1024, block_k=64, block_n=128, warps=4, stages=3, fused=True),
       (4096, 11008): dict(chunk=1024, block_k=64, block_n=128, warps=4, stages=4, fused=True)}
COPIES = 4


OURS_GRID = [dict(chunk=c, block_k=k, block_n=n, warps=w, stages=3, fused=True)
             for c in (256, 512) for k in (32, 64) for n in (64, 128, 256) for w in (4, 8)]
TEAL_GRID = [dict(split_k=sk, block_n=n, block_k=32, warps=w) for sk in (8, 16, 32) for n in (64, 128, 256) for w in (4, 8)]


def tune(Wts, x, tau, ones):
    """Best launch configuration of ours and of the TEAL-style kernel for one shape (s=0.5, B=1)."""
    empty_at = torch.empty(Wts[0].shape[0], 0, device="cuda", dtype=x.dtype)
    empty_u = torch.empty(Wts[0].shape[1], 0, device="cuda", dtype=x.dtype)
    ours = {}
    for i, cfg in enumerate(OURS_GRID):
        try:
            ours[i] = bench(lambda: [tg._launch(x, Wt, empty_at, empty_u, ones, tau, None, cfg) for Wt in Wts])
        except Exception as e:  # a config that does not compile (resources) is skipped
            print("skip", cfg, type(e).__name__)
    teal = {}
    for i, cfg in enumerate(TEAL_GRID):
        teal[i] = bench(lambda: [teal_gemv(x[0], Wt, tau, **cfg) for Wt in Wts])
    bo, bt = min(ours, key=ours.get), min(teal, key=teal.get)
    return OURS_GRID[bo], ours[bo], TEAL_GRID[bt], teal[bt], ours


def _print_row(row: dict, skip=("top5",)) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in skip), flush=True)


def _write(name: str, result: dict) -> None:
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as fh:
            json.dump(result, fh, indent=1)


def finish(name: str, result: dict) -> None:
    """The run's JSON: written as $OUT/name (if OUT is set) and printed as the last line."""
    _write(name, result)
    print(json.dumps(result))


def bench(fn, rep=300, copies=COPIES):
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") / copies * 1e3  # us per call


def time_grid(cands, call, ref, weights, rep=100, tag="", result=lambda y: y):
    """{index: us per call} of the launch configurations `cands`: call(cfg, w) on the first weight
    copy checked against ref first (relative error < 1e-2 of result(output)), then timed over all the
    copies; a configuration that gives a wrong result or does not compile (resources) is skipped."""
    times = {}
    for i, cfg in enumerate(cands):
        try:
            err = ((result(call(cfg, weights[0])).float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                print("wrong", tag, cfg, err, flush=True)
                continue
            times[i] = bench(lambda: [call(cfg, w) for w in weights], rep=rep, copies=len(weights))
        except Exception as e:
            print("skip", tag, cfg, type(e).__name__, str(e)[:120], flush=True)
    return times


# --variants dot|waves. Grids of kernels since removed: session 2's "fma" (the v4 CUDA-core kernel,
# gpu_kernels_v4.json); session 10's "masked" (the gather without compaction, 16 configurations per
# shape against the tuned compacting gather; lost on every shape: gpu_kernels_masked_s11.json)
GRIDS = {
    "dot": [dict(chunk=c, block_k=k, block_n=n, warps=w, stages=st, fused=True)
            for c in (512, 1024) for k in (32, 64) for n in (128, 256) for w in (4, 8) for st in (3, 4, 5)],
    # more, shorter programs: is the tail of the last wave (448 programs on 132 SMs) the limiter?
    "waves": [dict(chunk=c, block_k=64, block_n=n, warps=4, stages=st, fused=True)
              for c in (256, 512, 1024, 2048) for n in (64, 128) for st in (3, 4)],
}
VARIANT_FILES = {"dot": "gpu_kernels_v5_stages.json", "waves": "gpu_kernels_v6_waves.json"}


def _case50(out_f: int, in_f: int, rows: int, dt=torch.bfloat16):
    """COPIES random bf16 weights (and their Wt), `rows` Laplace input rows, unit scales, the threshold
    dropping half of row 0's channels, and empty rank factors (r = 0)."""
    Ws = [(torch.randn(out_f, in_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
    x = torch.distributions.Laplace(0.0, 1.0).sample((rows, in_f)).to("cuda", dt)
    tau = torch.quantile(x[0].float().abs(), 0.5).reshape(())
    return (Ws, [W.t().contiguous() for W in Ws], x, torch.ones(in_f, device="cuda", dtype=dt), tau,
            torch.empty(in_f, 0, device="cuda", dtype=dt), torch.empty(out_f, 0, device="cuda", dtype=dt))


def oracle_case50(out_f: int, in_f: int, bw: float):
    """`_case50` at batch 1 with its float32 oracle and floor (µs: the kept rows' bytes at copy bandwidth
    bw): (Wts, x, ones, tau, ref, floor_us)."""
    Ws, Wts, x, ones, tau, at, u = _case50(out_f, in_f, 1)
    ref = rsparse_linear_ref(x.float(), Ws[0].float(), None, tau, ones.float(), u.float(), at.t().float())
    kept = ((x[0].float().abs() > tau).sum() / in_f).item()
    return Wts, x, ones, tau, ref, 2 * out_f * in_f * kept / bw * 1e6


def device_bandwidth() -> float:
    """The copy bandwidth (bytes/s), printed with the device's name."""
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    return bw


def variants(bw, name):
    """A grid of launch configurations (GRIDS[name]) against v2 (the shape's configured one) and the
    TEAL-style kernel, 50%, r = 0: the grid per shape at batch 1, then the winner at batch 2/4/8. Writes
    the best configuration per shape ($OUT/VARIANT_FILES[name]) for `rsparse bench --device cuda --tuned`."""
    grid = GRIDS[name]
    best, rows = {}, []
    for out_f, in_f in SHAPES:
        Ws, Wts, x8, ones, tau, at, u = _case50(out_f, in_f, 8)
        dense_us = bench(lambda: [torch.nn.functional.linear(x8[:1], W) for W in Ws])
        teal_us = bench(lambda: [teal_gemv(x8[0], Wt, tau, **TEAL_BEST.get((out_f, in_f), {})) for Wt in Wts])
        v2 = tg.config_for(out_f, 0, in_f)
        cands = [v2] + [c for c in grid if c != v2]
        ref = rsparse_linear_ref(x8[:1].float(), Ws[0].float(), None, tau, ones.float(), u.float(), at.t().float())
        times = time_grid(cands, lambda cfg, Wt: tg._launch(x8[:1], Wt, at, u, ones, tau, None, cfg), ref, Wts)
        order = sorted(times, key=times.get)
        bi = order[0]
        best[f"{out_f}x{in_f}"] = cands[bi]
        for B in (1, 2, 4, 8):
            x = x8[:B]
            kept = (x.float().abs() > tau).any(0).float().mean().item()
            t_best = bench(lambda: [tg._launch(x, Wt, at, u, ones, tau, None, cands[bi]) for Wt in Wts])
            t_v2 = bench(lambda: [tg._launch(x, Wt, at, u, ones, tau, None, v2) for Wt in Wts])
            must_b = 2 * kept * in_f * out_f
            row = {"out": out_f, "in": in_f, "batch": B, "kept_union": kept, "dense_us": dense_us, "teal_us": teal_us if B == 1 else None,
                   "v2_us": t_v2, "best_us": t_best, "best_cfg": cands[bi],
                   "best_bw_frac": must_b / (t_best * 1e-6) / bw, "v2_bw_frac": must_b / (t_v2 * 1e-6) / bw,
                   "speedup_vs_dense": dense_us / t_best, "speedup_vs_teal": teal_us / t_best if B == 1 else None,
                   "top5": [(cands[i], times[i]) for i in order[:5]]}
            rows.append(row)
            _print_row(row)
    print(f"\n{'out x in':14s} {'B':>2s} {'dense':>7s} {'teal':>7s} {'v2':>7s} {'best':>7s} {'x dense':>8s} {'x teal':>7s} {'BW best':>8s}")
    for r in rows:
        print(f"{r['out']:>5d} x {r['in']:<6d} {r['batch']:2d} {r['dense_us']:7.2f} {r['teal_us'] or float('nan'):7.2f} {r['v2_us']:7.2f} "
              f"{r['best_us']:7.2f} {r['speedup_vs_dense']:8.2f} {r['speedup_vs_teal'] or float('nan'):7.2f} {r['best_bw_frac']:8.1%}")
    _write(VARIANT_FILES[name], {"copy_bw_TBps": bw / 1e12, "best": best, "rows": rows})
    print(json.dumps({"best": best, "bw_b1": {f"{r['out']}x{r['in']}": round(r["best_bw_frac"], 3) for r in rows if r["batch"] == 1}}))


GROUPS = {"llama3 qkv": ((4096, 1024, 1024), 4096), "llama3 gate|up": ((14336, 14336), 4096),
          "llama2 qkv": ((4096, 4096, 4096), 4096), "llama2 gate|up": ((11008, 11008), 4096)}
GROUP_GRID = [dict(chunk=c, block_k=64, block_n=n, warps=4, stages=st, fused=True)
              for c in (512, 1024) for n in (128, 256) for st in (3, 4)]


def groups(bw):
    """Projections that share an input, 50%, batch 1: the members one launch pair each (as the decoder
    runs them unfused) vs one fused launch pair over [Wt_0 | Wt_1 | ...] (`rsparse_group_gemv`), each
    member with its own threshold; dense cuBLAS on the concatenated weight for reference. The fused
    configurations are swept (members must start on output tiles); the best per shape goes to
    $OUT/gpu_groups.json ("best", the format of gpu_decode.py --tuned)."""
    dt = torch.bfloat16
    rows, best = [], {}
    for name, (outs, in_f) in GROUPS.items():
        total = sum(outs)
        Wts = [[(torch.randn(in_f, o, device="cuda") / in_f**0.5).to(dt) for o in outs] for _ in range(COPIES)]
        cats = [torch.cat(w, 1).contiguous() for w in Wts]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
        cs = torch.ones(len(outs), in_f, device="cuda", dtype=dt)
        taus = torch.stack([torch.quantile(x.float().abs(), q) for q in (0.5, 0.45, 0.55)[:len(outs)]])
        empty_at = [torch.empty(in_f, 0, device="cuda", dtype=dt)]
        dense_us = bench(lambda: [x @ c for c in cats])
        lk = tg.tile_locks(max(outs), "cuda")  # the modules' tile counters: zeroed once, left zeroed by each call
        sep_us = bench(lambda: [rsparse_gemv(x, w, empty_at[0], torch.empty(w.shape[1], 0, device="cuda", dtype=dt), cs[i], taus[i], lk)
                                for ws in Wts for i, w in enumerate(ws)])
        seg = [sum(outs[:i + 1]) for i in range(len(outs))] + [total] * 2
        ref = torch.cat([rsparse_linear_ref(x.float(), w.t().float(), None, taus[i], cs[i].float(),
                                            torch.zeros(w.shape[1], 0, device="cuda"), torch.zeros(0, in_f, device="cuda"))
                         for i, w in enumerate(Wts[0])], 1)
        times = {}
        for i, cfg in enumerate(GROUP_GRID):
            if any(o % cfg["block_n"] for o in outs[:-1]):
                continue
            y = tg._launch(x, cats[0], empty_at[0], cats[0].new_empty(total, 0), cs, taus, None, cfg, segments=(seg[0], seg[1]))
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, cfg, err)
            times[i] = bench(lambda: [tg._launch(x, c, empty_at[0], c.new_empty(total, 0), cs, taus, None, cfg, segments=(seg[0], seg[1]))
                                      for c in cats], rep=100)
        bi = min(times, key=times.get)
        best[f"{total}x{in_f}"] = GROUP_GRID[bi]
        kept = sum(o * (x.float().abs() > t).float().mean().item() for o, t in zip(outs, taus))
        must = 2 * kept * in_f
        row = {"group": name, "outs": outs, "in": in_f, "dense_concat_us": dense_us, "separate_us": sep_us, "fused_us": times[bi],
               "fused_cfg": GROUP_GRID[bi], "fused_vs_separate": sep_us / times[bi], "fused_vs_dense": dense_us / times[bi],
               "fused_bw_frac": must / (times[bi] * 1e-6) / bw, "separate_bw_frac": must / (sep_us * 1e-6) / bw, "rel_err": err}
        rows.append(row)
        _print_row(row)
    print(f"\n{'group':16s} {'dense':>7s} {'separate':>9s} {'fused':>7s} {'x sep':>6s} {'x dense':>8s} {'BW fused':>9s} {'BW sep':>7s}")
    for r in rows:
        print(f"{r['group']:16s} {r['dense_concat_us']:7.2f} {r['separate_us']:9.2f} {r['fused_us']:7.2f} {r['fused_vs_separate']:6.2f} "
              f"{r['fused_vs_dense']:8.2f} {r['fused_bw_frac']:9.1%} {r['separate_bw_frac']:7.1%}")
    _write("gpu_groups.json", {"copy_bw_TBps": bw / 1e12, "best": best, "rows": rows})
    print(json.dumps({"best": best, "fused_vs_separate": {r["group"]: round(r["fused_vs_separate"], 3) for r in rows}}))


SPLITK_SHAPES = {  # name: (member widths side by side, in); gate|up runs with SiLU(gate) * up (GLU)
    "llama3 gate|up": ((14336, 14336), 4096), "4096x14336": ((4096,), 14336), "llama3 qkv": ((4096, 1024, 1024), 4096),
    "4096x4096": ((4096,), 4096), "14336x4096": ((14336,), 4096), "11008x4096": ((11008,), 4096), "4096x11008": ((4096,), 11008),
}


def splitk_grid(width: int, in_f: int) -> list:
    """v7 configurations worth timing for one launch over `width` output columns: 128..1100 programs
    (one to eight per SM), K_PER at least one chunk, deeper BLOCK_K for narrow tiles so that a
    program keeps ~16 KB of weight rows in flight per stage."""
    out = []
    for bn in (32, 64, 128, 256):
        ntile = triton.cdiv(width, bn)
        for sk in (1, 2, 4, 8, 16):
            if not 120 <= ntile * sk <= 1100 or triton.cdiv(in_f, sk) < 256:
                continue
            ch = 1024 if triton.cdiv(in_f, sk) >= 1024 else 512
            out.append(dict(chunk=ch, block_k=max(32, min(128, 8192 // bn)), block_n=bn, warps=4, stages=3, splits=sk))
    return out


def splitk(bw):
    """v7 (one launch, last ticket finishes the tile) against v5 (partials + epilogue launch, the TUNED
    configurations), the TEAL-style kernel and dense cuBLAS, 50%, batch 1 (then the winner at batch
    2/4/8), single projections and the Llama-3 fused groups. Each configuration is checked against the
    float32 oracle first. Writes $OUT/gpu_kernels_v7.json ("best": per shape the faster of v5 and the best
    v7 at batch 1, for `rsparse bench --device cuda --tuned`; session 5's file holds the best v7 instead)."""
    dt = torch.bfloat16
    rows, best = [], {}
    for name, (outs, in_f) in SPLITK_SHAPES.items():
        total, glu = sum(outs), "gate|up" in name
        width = total // 2 if glu else total
        Wts = [(torch.randn(in_f, total, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
        x8 = torch.distributions.Laplace(0.0, 1.0).sample((8, in_f)).to("cuda", dt)
        cs = torch.ones(len(outs), in_f, device="cuda", dtype=dt)
        seg = [sum(outs[:i + 1]) for i in range(len(outs))] + [total] * 2
        segments = (seg[0], seg[1]) if len(outs) > 1 else None
        empty_at, empty_u = torch.empty(in_f, 0, device="cuda", dtype=dt), torch.empty(total, 0, device="cuda", dtype=dt)

        def taus_for(x):
            return torch.stack([torch.quantile(x[0].float().abs(), q) for q in (0.5, 0.45, 0.55)[:len(outs)]])

        def reference(x, taus):
            parts = [rsparse_linear_ref(x.float(), Wts[0][:, a:b].t().float(), None, taus[i], cs[i].float(),
                                        torch.zeros(b - a, 0, device="cuda"), torch.zeros(0, in_f, device="cuda"))
                     for i, (a, b) in enumerate(zip([0] + seg[:len(outs) - 1], seg[:len(outs)]))]
            return torch.nn.functional.silu(parts[0]) * parts[1] if glu else torch.cat(parts, 1)

        def run(x, taus, cfg, wt):
            c, t = (cs, taus) if len(outs) > 1 else (cs[0], taus[0])
            return tg._launch(x, wt, empty_at, empty_u, c, t, None, cfg, segments=segments, glu=glu)

        x1 = x8[:1]
        taus = taus_for(x1)
        ref = reference(x1, taus)
        dense_us = bench(lambda: [x1 @ w for w in Wts])
        teal_us = bench(lambda: [teal_gemv(x8[0], w, taus[0], **TEAL_BEST.get((total, in_f), {})) for w in Wts]) if len(outs) == 1 else None
        v5 = dict(tg.config_for(total, 0, in_f), splits=None)
        if segments:
            v5["block_n"] = tg.group_block_n(seg[0], seg[1], total, in_f)
        cands = [v5] + [c for c in splitk_grid(width, in_f) if not segments or not any(b % c["block_n"] for b in seg[:len(outs) - 1])]
        call = lambda cfg, w: run(x1, taus, cfg, w)  # noqa: E731
        times = time_grid(cands, call, ref, Wts, tag=name)
        deeper = [dict(cands[i], stages=4) for i in sorted((i for i in times if i), key=times.get)[:3]]  # the three best v7, 4 stages
        for j, us in time_grid(deeper, call, ref, Wts, tag=name).items():
            times[len(cands) + j] = us
        cands += deeper
        bi = min((i for i in times if i), key=times.get)  # the best v7 configuration (rows compare it with v5)
        best[f"{total}x{in_f}"] = cands[bi] if times[bi] < times.get(0, float("inf")) else v5
        for B in (1, 2, 4, 8):
            x = x8[:B]
            tb = taus_for(x)
            errb = ((run(x, tb, cands[bi], Wts[0]).float() - reference(x, tb)).norm() / reference(x, tb).norm()).item()
            assert errb < 1e-2, (name, B, errb)
            t7 = bench(lambda: [run(x, tb, cands[bi], w) for w in Wts])
            t5 = bench(lambda: [run(x, tb, v5, w) for w in Wts])
            td = bench(lambda: [x @ w for w in Wts]) if B > 1 else dense_us
            kept = sum(o * (x.float().abs() * 1.0 > t).any(0).float().mean().item() for o, t in zip(outs, tb))
            must = 2 * kept * in_f
            row = {"shape": name, "outs": outs, "in": in_f, "batch": B, "glu": glu, "kept_union": kept / total,
                   "dense_us": td, "teal_us": teal_us if B == 1 else None, "v5_us": t5, "v7_us": t7, "v7_cfg": cands[bi],
                   "v7_bw_frac": must / (t7 * 1e-6) / bw, "v5_bw_frac": must / (t5 * 1e-6) / bw,
                   "v7_vs_v5": t5 / t7, "v7_vs_dense": td / t7, "v7_vs_teal": teal_us / t7 if teal_us and B == 1 else None,
                   "rel_err": errb, "top5": [(cands[i], times[i]) for i in sorted(times, key=times.get)[:5]]}
            rows.append(row)
            _print_row(row)
        _write("gpu_kernels_v7.json", {"copy_bw_TBps": bw / 1e12, "best": best, "rows": rows, "partial": True})
    print(f"\n{'shape':16s} {'B':>2s} {'dense':>7s} {'teal':>7s} {'v5':>7s} {'v7':>7s} {'v7/v5':>6s} {'x dense':>8s} {'x teal':>7s} {'BW v7':>6s} {'BW v5':>6s}  v7 config")
    for r in rows:
        c = r["v7_cfg"]
        print(f"{r['shape']:16s} {r['batch']:2d} {r['dense_us']:7.2f} {r['teal_us'] or float('nan'):7.2f} {r['v5_us']:7.2f} {r['v7_us']:7.2f} "
              f"{r['v7_vs_v5']:6.2f} {r['v7_vs_dense']:8.2f} {r['v7_vs_teal'] or float('nan'):7.2f} {r['v7_bw_frac']:6.1%} {r['v5_bw_frac']:6.1%}  "
              f"{'v5' if not c.get('splits') else 'bn%d sk%d ch%d bk%d st%d' % (c['block_n'], c['splits'], c['chunk'], c['block_k'], c['stages'])}")
    _write("gpu_kernels_v7.json", {"copy_bw_TBps": bw / 1e12, "best": best, "rows": rows})
    print(json.dumps({"best": best, "bw_v7_b1": {r["shape"]: round(r["v7_bw_frac"], 3) for r in rows if r["batch"] == 1},
                      "v7_vs_teal_b1": {r["shape"]: round(r["v7_vs_teal"], 3) for r in rows if r["batch"] == 1 and r["v7_vs_teal"]}}))


def fit_fixed_cost(points, bw) -> dict:
    """Least-squares time_us = fixed + bytes * slope over (bytes, us) points; streaming = 1 / slope."""
    a = torch.tensor([[1.0, m] for m, _ in points], dtype=torch.float64)
    t = torch.tensor([[us] for _, us in points], dtype=torch.float64)
    c, slope = torch.linalg.lstsq(a, t).solution[:, 0].tolist()
    tbps = 1e-6 / slope if slope > 0 else float("nan")  # bytes per us = 1e6 bytes/s; 1e-6 / slope TB/s
    return {"fixed_us": c, "stream_TBps": tbps, "stream_frac_of_copy": tbps * 1e12 / bw}


def fixed_cost(bw):
    """Where a call's time goes: v5 (TUNED's two-launch configuration), v7 (one launch) and the TEAL-style
    kernel timed at kept fractions 0.02..0.9, batch 1, then time = c + bytes / b fitted by least squares:
    c is the fixed cost per call (launches, compaction, ramp, tail), b the streaming bandwidth."""
    dt = torch.bfloat16
    kernels = {"v5": dict(chunk=1024, block_k=64, block_n=128, warps=4, stages=3, fused=True),
               "v7": dict(chunk=1024, block_k=128, block_n=64, warps=4, stages=3, splits=4)}
    rows, fits = [], {}
    for out_f, in_f in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        Wts = [(torch.randn(in_f, out_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
        ones = torch.ones(in_f, device="cuda", dtype=dt)
        at, u = torch.empty(in_f, 0, device="cuda", dtype=dt), torch.empty(out_f, 0, device="cuda", dtype=dt)
        dense_us = bench(lambda: [x @ w for w in Wts])
        pts = {k: [] for k in (*kernels, "teal")}
        for keep in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9):
            tau = torch.quantile(x.float().abs(), 1 - keep).reshape(())
            kept = (x.float().abs() > tau).float().mean().item()
            must = 2 * kept * in_f * out_f
            for name, cfg in kernels.items():
                pts[name].append((must, bench(lambda: [tg._launch(x, w, at, u, ones, tau, None, cfg) for w in Wts], rep=100)))
            pts["teal"].append((must, bench(lambda: [teal_gemv(x[0], w, tau, **TEAL_BEST.get((out_f, in_f), {})) for w in Wts], rep=100)))
            rows.append({"out": out_f, "in": in_f, "kept": kept, "dense_us": dense_us, **{k: v[-1][1] for k, v in pts.items()}})
            _print_row(rows[-1])
        for name in pts:
            fits[f"{out_f}x{in_f} {name}"] = fit_fixed_cost(pts[name], bw)
            print(f"{out_f}x{in_f} {name}: {fits[f'{out_f}x{in_f} {name}']} (dense cuBLAS {dense_us:.2f} us)", flush=True)
    _write("gpu_kernels_fixed_cost.json", {"copy_bw_TBps": bw / 1e12, "fits": fits, "rows": rows})
    print(json.dumps({"fits": fits}))


def teal_sweep(bw, shapes):
    """Is the TEAL-style baseline weak because of its configuration? (Its time is flat in sparsity:
    latency per loop step, not bytes.) Fewer, longer splits with deeper K steps and 4 pipeline stages,
    50%, batch 1, against ours (TUNED) on `shapes` (OUTxIN comma list after --teal-sweep; default the
    target's 14336x4096, 4096x14336, 4096x4096)."""
    dt = torch.bfloat16
    grid = [dict(split_k=32, block_n=128, block_k=32, warps=4, stages=3)] + [  # the tuned one, then deeper K steps
        dict(split_k=sk, block_n=n, block_k=k, warps=4, stages=4) for sk in (4, 8, 16) for n in (128, 256) for k in (64, 128)]
    rows = []
    for out_f, in_f in shapes:
        Wts = [(torch.randn(in_f, out_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
        ones = torch.ones(in_f, device="cuda", dtype=dt)
        at, u = torch.empty(in_f, 0, device="cuda", dtype=dt), torch.empty(out_f, 0, device="cuda", dtype=dt)
        tau = torch.quantile(x.float().abs(), 0.5).reshape(())
        ref = rsparse_linear_ref(x.float(), Wts[0].t().float(), None, tau, ones.float(), u.float(), at.t().float())
        lk = tg.tile_locks(out_f, "cuda")
        ours = bench(lambda: [rsparse_gemv(x, w, at, u, ones, tau, lk) for w in Wts])
        times = {}
        for i, cfg in enumerate(grid):
            yt = teal_gemv(x[0], Wts[0], tau, **cfg)
            if ((yt.float() - ref[0]).norm() / ref.norm()).item() < 1e-2:
                times[i] = bench(lambda: [teal_gemv(x[0], w, tau, **cfg) for w in Wts], rep=100)
        bi = min(times, key=times.get)
        must = 2 * 0.5 * in_f * out_f
        row = {"out": out_f, "in": in_f, "ours_us": ours, "teal_best_us": times[bi], "teal_best_cfg": grid[bi],
               "ours_vs_teal": times[bi] / ours, "teal_bw_frac": must / (times[bi] * 1e-6) / bw,
               "teal_all": [(grid[i], times[i]) for i in sorted(times, key=times.get)]}
        rows.append(row)
        _print_row(row, skip=("teal_all",))
    _write("gpu_kernels_teal_sweep.json", {"copy_bw_TBps": bw / 1e12, "rows": rows})


# Shapes of other Llama-family models (3B, 1B, 13B; members and fused group widths): session 11's `--rule`
# timed config_for's rule of that time on them (gpu_kernels_rule_s11.json, code at 32b607d); session 12's
# benchmarks/gpu_gather_grid.py times them with a larger grid and replaced that mode
RULE_SHAPES = [(3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192), (5120, 3072), (16384, 3072),  # Llama-3.2-3B (+ groups)
               (2048, 2048), (16384, 2048), (2048, 8192),  # Llama-3.2-1B (o, gate|up group, down)
               (13824, 5120), (5120, 13824), (15360, 5120)]  # Llama-2-13B (gate, down, q|k|v group)


def dense_gemv_us(x, Ws):
    """(µs per call, error) of the dense product as inductor computes it with coordinate-descent tuning
    on (`rsparse.decode.GPU_INDUCTOR`: a Triton reduction of its own instead of cuBLAS; the whole dense
    step 21% faster than cuBLAS in session 17), timed like the other columns; (None, message) if it fails."""
    import torch._inductor.config as inductor_config

    from rsparse.decode import gpu_inductor

    try:
        torch._dynamo.reset()  # one compile per shape, under these settings (dynamo does not guard on them)
        with inductor_config.patch(gpu_inductor()):
            f = torch.compile(lambda a, w: torch.nn.functional.linear(a, w), dynamic=False)
            y = f(x, Ws[0])
            ref = torch.nn.functional.linear(x.float(), Ws[0].float())
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                return None, f"wrong result: relative error {err:.3g}"
            return bench(lambda: [f(x, W) for W in Ws]), None
    except Exception as e:  # a failing compile must not cost the table
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def gather_columns(x, Wts, ones, tau, ref) -> dict:
    """µs of the r = 0 gather alone (float32 partials, no sum), Triton's (`rsparse_partials`) and, where nvcc
    builds it, the CUDA one (`cuda_partials`), each checked against the oracle through its partials' sum."""
    from rsparse.kernels import cuda_gather

    out_f = Wts[0].shape[1]
    at, u = Wts[0].new_empty(Wts[0].shape[0], 0), Wts[0].new_empty(out_f, 0)
    lk = tg.tile_locks(out_f, "cuda")
    calls = {"triton_gather_us": lambda Wt: torch.ops.rsparse.rsparse_partials(x, Wt, at, u, ones, tau, lk, out_f, out_f, 0, 0)}
    cuda = x.shape[0] <= cuda_gather.MAX_ROWS  # the modules hand it batch 1 only (batches 2-8 timed in session 35)
    if cuda and cuda_gather.ensure_built():
        calls["cuda_gather_us"] = lambda Wt: torch.ops.rsparse.cuda_partials(x, Wt, ones, tau, out_f, out_f)
        # fewer, larger blocks: a quarter of the partials for the consumer (session 34's suspect), at what cost alone
        calls["cuda_gather_kc4_us"] = lambda Wt: torch.ops.rsparse.cuda_partials(x, Wt, ones, tau, out_f, out_f, 4)
    elif cuda:
        print("cuda gather skipped:", cuda_gather.build_error() or "no nvcc", flush=True)
    cols = {}
    for name, call in calls.items():
        err = ((call(Wts[0]).sum(0) - ref.float()).norm() / ref.norm()).item()
        assert err < 1e-2, (name, err)
        cols[name] = bench(lambda: [call(Wt) for Wt in Wts])
    return cols


def main():
    torch.manual_seed(0)
    try:
        dt = gpu_dtype(DTYPE)
    except RSparseError as e:
        sys.exit(str(e))
    bw = device_bandwidth()
    if "--variants" in sys.argv:
        name = sys.argv[sys.argv.index("--variants") + 1] if sys.argv[-1] != "--variants" else None
        if name not in GRIDS:
            sys.exit(f"--variants: one of {', '.join(GRIDS)}, got {name!r}")
        return variants(bw, name)
    if "--groups" in sys.argv:
        return groups(bw)
    if "--splitk" in sys.argv:
        return splitk(bw)
    if "--fixed-cost" in sys.argv:
        return fixed_cost(bw)
    if "--teal-sweep" in sys.argv:
        i = sys.argv.index("--teal-sweep") + 1
        spec = sys.argv[i] if i < len(sys.argv) else "14336x4096,4096x14336,4096x4096"
        return teal_sweep(bw, [tuple(int(v) for v in s.split("x")) for s in spec.split(",")])
    rows, checks, tuned = [], [], []
    for out_f, in_f in SHAPES:
        Ws = [(torch.randn(out_f, in_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
        Wts = [W.t().contiguous() for W in Ws]
        x1 = torch.distributions.Laplace(0.0, 1.0).sample((8, in_f)).to("cuda", dt)
        ones = torch.ones(in_f, device="cuda", dtype=dt)
        dense_us = bench(lambda: [torch.nn.functional.linear(x1[:1], W) for W in Ws])
        gemv_us, gemv_err = dense_gemv_us(x1[:1], Ws)
        tcfg = TEAL_BEST.get((out_f, in_f), {})
        if TUNE:
            tau50 = torch.quantile(x1[0].float().abs(), 0.5).reshape(())
            ocfg, ous, tcfg, tus, _ = tune(Wts, x1[:1], tau50, ones)
            tuned.append({"out": out_f, "in": in_f, "ours_cfg": ocfg, "ours_us": ous, "teal_cfg": tcfg, "teal_us": tus,
                          "dense_us": dense_us})
            print("tuned", tuned[-1], flush=True)
        for s in (0.5, 0.7):
            for alpha in (1.0, 0.95, 0.9):  # 0.9: the ranks (96-144 at 50%) of the end-to-end --alpha 0.9 runs
                al = allocate(out_f, in_f, s, alpha, RANK_ALIGN)  # ranks in the modules' stored multiple of 16
                R = al.rank
                tau = torch.quantile(x1[0].float().abs(), 1 - al.keep).reshape(())
                Us = [torch.randn(out_f, R, device="cuda").to(dt) / 8 for _ in range(COPIES)]
                Ats = [torch.randn(in_f, R, device="cuda").to(dt) / 8 for _ in range(COPIES)]
                for B in ((1, 2, 4, 8) if alpha == 1.0 and s == 0.5 else (1,)):
                    x = x1[:B]
                    ref = rsparse_linear_ref(x.float(), Ws[0].float(), None, tau, ones.float(), Us[0].float(), Ats[0].t().float())
                    lk = tg.tile_locks(out_f, "cuda")
                    y = rsparse_gemv(x, Wts[0], Ats[0], Us[0], ones, tau, lk)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    checks.append(err)
                    assert torch.isfinite(y).all() and err < 1e-2, (out_f, in_f, s, alpha, B, err)
                    ours = bench(lambda: [rsparse_gemv(x, Wt, At, U, ones, tau, lk) for Wt, At, U in zip(Wts, Ats, Us)])
                    kept_any = (x.float().abs() > tau).any(0).float().mean().item()
                    dropped_any = (x.float().abs() <= tau).any(0).float().mean().item()
                    must = 2 * (kept_any * in_f * out_f + R * (out_f + dropped_any * in_f))
                    row = {"out": out_f, "in": in_f, "sparsity": s, "alpha": alpha, "rank": R, "batch": B,
                           "kept": kept_any, "dense_us": dense_us, "ours_us": ours, "rel_err": err,
                           "ours_bw_frac": must / (ours * 1e-6) / bw, "speedup_vs_dense": dense_us / ours}
                    if gemv_us is not None:  # against the faster of the two dense products
                        row.update(dense_gemv_us=gemv_us, speedup_vs_best_dense=min(dense_us, gemv_us) / ours)
                    elif gemv_err:
                        row["dense_gemv_error"] = gemv_err
                    if (out_f, in_f) in S11 and (R or not tg.config_for(out_f, 0, in_f).get("splits")):
                        old = S11[(out_f, in_f)]
                        yo = tg._launch(x, Wts[0], Ats[0], Us[0], ones, tau, None, old)
                        assert ((yo.float() - ref).norm() / ref.norm()).item() < 1e-2, ("s11", out_f, in_f)
                        row["s11_cfg_us"] = bench(lambda: [tg._launch(x, Wt, At, U, ones, tau, None, old)
                                                           for Wt, At, U in zip(Wts, Ats, Us)])
                    for mode in (m for m in tg.RANK_MODES if R and m != tg.RANK_TERMS):  # A/B: the other rank paths
                        zcfg = dict(tg.config_for(out_f, R, in_f), rank_terms=mode)
                        yz = tg._launch(x, Wts[0], Ats[0], Us[0], ones, tau, None, zcfg)
                        assert ((yz.float() - ref).norm() / ref.norm()).item() < 1e-2, (mode, out_f, in_f)
                        row[f"rank_{mode}_us"] = bench(lambda: [tg._launch(x, Wt, At, U, ones, tau, None, zcfg)
                                                                for Wt, At, U in zip(Wts, Ats, Us)])
                    if R == 0:  # the gathers alone, as compiled steps run them: Triton's and the CUDA one (session 33)
                        row.update(gather_columns(x, Wts, ones, tau, ref))
                    if B == 1 and R == 0:
                        yt = teal_gemv(x[0], Wts[0], tau, **tcfg)
                        errt = ((yt.float() - ref[0]).norm() / ref.norm()).item()
                        assert errt < 1e-2, errt
                        teal = bench(lambda: [teal_gemv(x[0], Wt, tau, **tcfg) for Wt in Wts])
                        row.update(teal_us=teal, speedup_vs_teal=teal / ours, teal_bw_frac=must / (teal * 1e-6) / bw)
                    rows.append(row)
                    _print_row(row)

    # the op is registered with torch.library.triton_op: a reduce-overhead compile captures it
    Wt, x = Wts[0], x1[:1]
    tau = torch.quantile(x.float().abs(), 0.5).reshape(())
    empty_at, empty_u = torch.empty(Wt.shape[0], 0, device="cuda", dtype=dt), torch.empty(Wt.shape[1], 0, device="cuda", dtype=dt)
    lk = tg.tile_locks(Wt.shape[1], "cuda")
    f = torch.compile(lambda x: torch.ops.rsparse.rsparse_gemv(x, Wt, empty_at, empty_u, ones, tau, lk) * 2, mode="reduce-overhead")
    for _ in range(3):
        yc = f(x)
    ye = rsparse_gemv(x, Wt, empty_at, empty_u, ones, tau, lk) * 2
    compiled_ok = bool(torch.equal(yc, ye))

    print(f"\n{'shape (out x in)':18s} {'s':>4s} {'a':>5s} {'r':>4s} {'B':>2s} {'dense us':>9s} {'gemv us':>8s} {'teal us':>8s} {'ours us':>8s} "
          f"{'x dense':>8s} {'x teal':>7s} {'BW ours':>8s} {'BW teal':>8s} {'s11 cfg':>8s}" + "".join(f" {m + ' us':>14s}" for m in tg.RANK_MODES))
    for r in rows:
        print(f"{r['out']:>6d} x {r['in']:<8d} {r['sparsity']:4.2f} {r['alpha']:5.2f} {r['rank']:4d} {r['batch']:2d} {r['dense_us']:9.2f} "
              f"{r.get('dense_gemv_us', float('nan')):8.2f} {r.get('teal_us', float('nan')):8.2f} {r['ours_us']:8.2f} {r['speedup_vs_dense']:8.2f} "
              f"{r.get('speedup_vs_teal', float('nan')):7.2f} {r['ours_bw_frac']:8.1%} {r.get('teal_bw_frac', float('nan')):8.1%} "
              f"{r.get('s11_cfg_us', float('nan')):8.2f}"
              + "".join(f" {r.get(f'rank_{m}_us', r['ours_us'] if r['rank'] and m == tg.RANK_TERMS else float('nan')):14.2f}"
                        for m in tg.RANK_MODES))
    summary = {"dtype": str(dt).removeprefix("torch."), "copy_bw_TBps": bw / 1e12, "tuned": tuned, "compiled_graph_ok": compiled_ok, "max_rel_err": max(checks),
               "median_speedup_vs_teal_b1_s50": statistics.median(r["speedup_vs_teal"] for r in rows if "speedup_vs_teal" in r and r["sparsity"] == 0.5),
               "speedup_vs_best_dense_b1_s50_r0": {f"{r['out']}x{r['in']}": r.get("speedup_vs_best_dense") for r in rows
                                                   if r["batch"] == 1 and r["sparsity"] == 0.5 and r["rank"] == 0},
               "rows": rows}
    _write("gpu_kernels.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
