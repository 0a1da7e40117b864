"""Does the weight layout limit the gather? Row-major Wt (in, out) against tile-major Wt (out / T, in, T).

Row-major: a program of output tile n0..n0+BN reads, for each kept channel j, BN * 2 bytes at
j * out + n0: short reads (256 B at BN = 128) one row stride (8-28 KB) apart. Tile-major with T = BN:
the same bytes, but a program's kept rows lie in one contiguous slab of in * BN * 2 bytes, so its
reads are nearby and in address order (half of the 256 B rows of each 1 KB+ span at 50%). The kernel
is the same (`tl_common._gather_rows` addresses both); only LDW and the buffer change.

Also the gather's fixed cost: the same call at kept fractions ~0 and 0.02 (launch, compaction
prologue, partial stores, tail; no weight bytes to speak of).

Per shape (50%, batch 1, bf16, the gather alone as compiled steps run it, r = 0): dense cuBLAS, the
shape's gather configuration row-major, and a grid of tile-major configurations; each checked against
the float32 oracle first. Prints a table, ends with one JSON line, writes $OUT/gpu_layout.json.
`PYTHONPATH=src python3 benchmarks/gpu_layout.py`
"""
import json
import statistics

import torch
import triton

from gpu_kernels import _case50, _print_row, _write, bench
from rsparse.gpubench import copy_bandwidth
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.tl_common import BB
from rsparse.linear import rsparse_linear_ref

SHAPES = [(14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008), (4096, 4096), (1024, 4096),
          (28672, 4096), (6144, 4096)]  # MLP, attention, then Llama-3-8B's gate|up and q|k|v group widths
GRID = [dict(chunk=c, block_k=k, block_n=n, warps=4, stages=st)
        for n in (128, 256) for c in (512, 1024, 2048) for k in (64, 128) for st in (3, 4)]


def tile_major(wt: torch.Tensor, t: int) -> torch.Tensor:
    """(in, out) -> (ceil(out / t), in, t), the last tile zero-padded."""
    i, o = wt.shape
    pad = -o % t
    return torch.nn.functional.pad(wt, (0, pad)).reshape(i, (o + pad) // t, t).permute(1, 0, 2).contiguous()


def gather(x, w, out_f, ldw, ones, tau, cfg):
    """`_fused_gather_gemv` on either layout (ldw: row stride inside a tile); returns the float32 partials."""
    B, IN = x.shape
    ch, bn = cfg["chunk"], cfg["block_n"]
    nchunk, ntile = triton.cdiv(IN, ch), triton.cdiv(out_f, bn)
    ypart = torch.empty(nchunk, B, out_f, dtype=torch.float32, device=x.device)
    scratch = torch.empty(ntile * nchunk * ch, dtype=torch.int32, device=x.device)
    tg._fused_gather_gemv[(ntile, nchunk)](x, ones, tau, w, scratch, ypart, B, IN, out_f, ldw, out_f, out_f,
                                           CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn,
                                           num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart


def main():
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for out_f, in_f in SHAPES:
        Ws, Wts, x, ones, tau, at, u = _case50(out_f, in_f, 1)
        ref = rsparse_linear_ref(x.float(), Ws[0].float(), None, tau, ones.float(), u.float(), at.t().float())

        def ok(parts):
            return ((parts.sum(0) - ref).norm() / ref.norm()).item() < 1e-2

        dense_us = bench(lambda: [torch.nn.functional.linear(x, W) for W in Ws])
        base = dict(tg.config_for(out_f, 0, in_f, reduce=False))
        assert ok(gather(x, Wts[0], out_f, out_f, ones, tau, base))
        row_us = bench(lambda: [gather(x, Wt, out_f, out_f, ones, tau, base) for Wt in Wts])
        # the fixed cost: nothing kept (tau above every score) and ~2% kept
        none_us = bench(lambda: [gather(x, Wt, out_f, out_f, ones, tau * 1e6, base) for Wt in Wts])
        tau2 = torch.quantile(x[0].float().abs(), 0.98).reshape(())
        two_us = bench(lambda: [gather(x, Wt, out_f, out_f, ones, tau2, base) for Wt in Wts])
        tiled, times = {}, {}
        for i, cfg in enumerate(GRID):
            t = cfg["block_n"]
            if t not in tiled:
                tiled[t] = [tile_major(Wt, t) for Wt in Wts]
            try:
                if not ok(gather(x, tiled[t][0], out_f, t, ones, tau, cfg)):
                    print("wrong", cfg, flush=True)
                    continue
                times[i] = bench(lambda: [gather(x, w, out_f, t, ones, tau, cfg) for w in tiled[t]], rep=100)
            except Exception as e:  # a configuration that does not fit (shared memory) is skipped
                print("skip", cfg, type(e).__name__, str(e)[:100], flush=True)
        same = next(i for i, c in enumerate(GRID) if all(c[k] == base[k] for k in ("chunk", "block_k", "block_n", "stages")))
        bi = min(times, key=times.get)
        must = 2 * 0.5 * out_f * in_f
        row = {"out": out_f, "in": in_f, "dense_us": dense_us, "row_major_us": row_us, "row_major_cfg": base,
               "tiled_same_cfg_us": times.get(same), "tiled_best_us": times[bi], "tiled_best_cfg": GRID[bi],
               "row_major_bw": must / (row_us * 1e-6) / bw, "tiled_best_bw": must / (times[bi] * 1e-6) / bw,
               "nothing_kept_us": none_us, "kept_2pct_us": two_us,
               "tiled_top5": [(GRID[i], times[i]) for i in sorted(times, key=times.get)[:5]]}
        rows.append(row)
        _print_row(row, skip=("tiled_top5",))
        torch.cuda.empty_cache()
    print(f"\n{'out x in':14s} {'dense':>7s} {'row-maj':>8s} {'tiled=':>7s} {'tiled*':>7s} {'BW row':>7s} {'BW til':>7s} {'0 kept':>7s} {'2% kept':>8s}")
    for r in rows:
        print(f"{r['out']:>5d} x {r['in']:<6d} {r['dense_us']:7.2f} {r['row_major_us']:8.2f} {r['tiled_same_cfg_us'] or float('nan'):7.2f} "
              f"{r['tiled_best_us']:7.2f} {r['row_major_bw']:7.1%} {r['tiled_best_bw']:7.1%} {r['nothing_kept_us']:7.2f} {r['kept_2pct_us']:8.2f}")
    summary = {"copy_bw_TBps": bw / 1e12,
               "median_row_over_tiled_best": statistics.median(r["row_major_us"] / r["tiled_best_us"] for r in rows),
               "rows": rows}
    _write("gpu_layout.json", summary)
    print(json.dumps({"median_row_over_tiled_best": summary["median_row_over_tiled_best"],
                      "tiled_best": {f"{r['out']}x{r['in']}": r["tiled_best_cfg"] for r in rows}}))


if __name__ == "__main__":
    main()
