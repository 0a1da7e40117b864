"""The gather's launch configuration, deeper K steps: time `_fused_gather_gemv` alone (what compiled
decode steps run; inductor sums the partials in the consumer) over a grid of K-step depths (64, 128,
256 rows), output tile widths and chunk lengths, on the Llama-3-8B and Llama-2-7B projection shapes
(members and the fused group widths) and on the shapes of `gpu_kernels.py --rule` (3B, 1B, 13B).

Session 12's layout run found 128-row K steps 8.7% faster in the median than the configured 64 (on
either weight layout); the earlier grids never went past 64 rows for this kernel. 50%, batch 1,
bf16, r = 0, each configuration checked against the float32 oracle first. Prints a table, ends with
one JSON line; writes $OUT/gpu_gather_grid.json whose "best" is a `rsparse bench --tuned` file.
`PYTHONPATH=src python3 benchmarks/gpu_gather_grid.py [--stages]`

--stages: the same against deeper software pipelines (written $OUT/gpu_gather_grid_stages.json).
Behind the gather's dependent index -> row loads, Triton keeps one weight tile in shared memory at
num_stages 3-4 (each K step waits for its own tile: no copy overlaps the next step's), two at 5-6,
three at 7-8 (`benchmarks/sass_report.py`'s tile_buffers; Triton 3.6, the H200 machine's, and 3.9
alike). Every grid before session 12 ran stages <= 4 except session 2's 64-row one; the big shapes
now run ~1.7 programs per SM, so the bytes in flight per program may be what bounds them. Session 13
(`gpu_gather_grid_stages_s13.json`): not so; 5 and 7 stages were 13-17% slower on the MLP shapes and
won only on small ones (4096x4096 +4%, 5120x3072 +13%, 16384x2048 +9%, 2048x8192 +11%). The kept
indices held in registers (no loop load feeding an address, num_stages - 1 tiles in flight) lost on
every shape, 25-35% on the MLP shapes (`gpu_gather_grid_regidx_s13.json`; removed, code at 17360c1).

--wide: wider output tiles (up to 512 columns) with shorter chunks (down to 128 channels), written
$OUT/gpu_gather_grid_wide.json, on the Llama-3-8B / Llama-2-7B shapes only. A kept row is read as one
segment of 2 * tile bytes: 128 B at the 64-wide tiles the rule gives 4096x4096, 512 B on the gate|up
group. Session 16's timeline saw the gather stream at 55% of copy bandwidth on o (64-wide) against
93% on gate|up (256-wide) while both ran 2 programs per SM; session 12's grid held the program count
up only with long chunks, so wide tiles there meant few programs (4096x4096 at tile 256, chunk 512:
128 programs). Configurations are kept where they give 120..1200 programs for the shape.
"""
import sys
import json
import statistics

import torch
import triton

from gpu_kernels import RULE_SHAPES, _case50, _print_row, _write, bench, device_bandwidth, time_grid
from rsparse.kernels import triton_gemv as tg
from rsparse.linear import rsparse_linear_ref

SHAPES = [(14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008), (4096, 4096), (1024, 4096),
          (28672, 4096), (6144, 4096), (22016, 4096), (12288, 4096)] + RULE_SHAPES
GRID = [dict(chunk=c, block_k=k, block_n=n, warps=4 if k * n <= 128 * 128 else 8, stages=3 if k * n <= 128 * 128 else 2, fused=True)
        for k in (64, 128, 256) for n in (64, 128, 256) for c in (512, 1024, 2048) if c >= k]
# two and three weight tiles in flight per program ((stages - 3) // 2 + 1 bf16 tiles, at most 160 KB)
STAGES = [dict(chunk=c, block_k=k, block_n=n, warps=4 if k * n <= 128 * 128 else 8, stages=s, fused=True)
          for k in (64, 128, 256) for n in (64, 128) for c in (512, 1024, 2048) for s in (5, 7)
          if c >= k and ((s - 3) // 2 + 1) * k * n * 2 <= 160 * 1024]
WIDE = [dict(chunk=c, block_k=k, block_n=n, warps=4 if k * n <= 128 * 128 else 8, stages=3 if k * n <= 128 * 128 else 2, fused=True)
        for c in (128, 256, 512, 1024, 2048) for n in (128, 256, 512) for k in (64, 128) if k <= c and k * n <= 128 * 256]
GRIDS = {"--stages": (STAGES, "gpu_gather_grid_stages.json"), "--wide": (WIDE, "gpu_gather_grid_wide.json")}
LLAMA_SHAPES = SHAPES[:10]  # --wide: Llama-3-8B and Llama-2-7B members and fused groups


def _programs(cfg: dict, out_f: int, in_f: int) -> int:
    return triton.cdiv(out_f, cfg["block_n"]) * triton.cdiv(in_f, cfg["chunk"])
KEYS = ("chunk", "block_k", "block_n", "warps", "stages")  # what makes two configurations differ


def main():
    grid, name = next((GRIDS[a] for a in sys.argv[1:] if a in GRIDS), (GRID, "gpu_gather_grid.json"))
    torch.manual_seed(0)
    bw = device_bandwidth()
    rows, best = [], {}
    wide = "--wide" in sys.argv[1:]
    for out_f, in_f in LLAMA_SHAPES if wide else SHAPES:
        Ws, Wts, x, ones, tau, at, u = _case50(out_f, in_f, 1)
        ref = rsparse_linear_ref(x.float(), Ws[0].float(), None, tau, ones.float(), u.float(), at.t().float())
        dense_us = bench(lambda: [torch.nn.functional.linear(x, W) for W in Ws])
        base = dict(tg.config_for(out_f, 0, in_f, reduce=False))
        cands = [base] + [c for c in grid if any(c.get(k) != base.get(k) for k in KEYS)
                          and (not wide or 120 <= _programs(c, out_f, in_f) <= 1200)]
        parts = {ch: torch.empty(triton.cdiv(in_f, ch), 1, out_f, device="cuda") for ch in {c["chunk"] for c in cands}}
        times = time_grid(cands, lambda cfg, Wt: tg._gather(x, Wt, ones, tau, parts[cfg["chunk"]], cfg, out_f, out_f), ref, Wts,
                          rep=60, result=lambda p: p.sum(0))
        order = sorted(times, key=times.get)
        bi = order[0]
        best[f"{out_f}x{in_f}"] = cands[bi]
        must = 2 * 0.5 * out_f * in_f
        row = {"out": out_f, "in": in_f, "dense_us": dense_us, "configured_us": times[0], "configured_cfg": base,
               "best_us": times[bi], "best_cfg": cands[bi], "configured_bw": must / (times[0] * 1e-6) / bw,
               "best_bw": must / (times[bi] * 1e-6) / bw, "top5": [(cands[i], times[i]) for i in order[:5]]}
        rows.append(row)
        _print_row(row, skip=("top5",))
    print(f"\n{'out x in':14s} {'dense':>7s} {'config':>7s} {'best':>7s} {'gain':>6s} {'BW cfg':>7s} {'BW best':>8s}  best (chunk, K rows, tile, warps, stages)")
    for r in rows:
        c = r["best_cfg"]
        print(f"{r['out']:>5d} x {r['in']:<6d} {r['dense_us']:7.2f} {r['configured_us']:7.2f} {r['best_us']:7.2f} "
              f"{r['configured_us'] / r['best_us']:6.3f} {r['configured_bw']:7.1%} {r['best_bw']:8.1%}  "
              f"{c['chunk']} {c['block_k']} {c['block_n']} {c['warps']} {c['stages']}")
    summary = {"copy_bw_TBps": bw / 1e12, "best": best, "rows": rows,
               "median_configured_over_best": statistics.median(r["configured_us"] / r["best_us"] for r in rows)}
    _write(name, summary)
    print(json.dumps({"median_configured_over_best": summary["median_configured_over_best"], "best": best}))


if __name__ == "__main__":
    main()
