"""Where a ranked call's fixed cost goes: a per-program timeline of the one-launch ranked gather.

Why (session 27, `gpu_rank_modes_s27_*.json`): a call with rank terms costs ~3.1-3.7 µs more than the
r = 0 gather at the same kept fraction even at rank 16-32, one rank block, whose bytes take ~0.5 µs.
Candidates: the per-call counter fill (a memset between calls), the z programs beside the tiles, each
tile's wait for z (an L2 atomic round trip), the U block's dependent loads at each tile's end.

Here the one-launch kernel's stamped twin (`_timed_ranked`: `_ranked_gather_gemv`'s one-launch branch
with `_ranked_tile` spelled out and %globaltimer stamps between; a change there belongs here too)
records per program: start, its z partial written (z programs) or its gather multiplied (tiles), the
wait for z over (tiles with rank blocks), end, SM. The r = 0 gather at the same kept fraction is
stamped by `gpu_timeline`'s twin. Each sequence runs the call on COPIES weight copies in one CUDA graph
(weights from HBM), the ranked ones each after its counter's fill, as `lowrank._ranked_gather` makes
them; the last replay's records are read. Per call (median over the copies), µs from the call's first
program start: z done (the last z program's count raised), the tiles' gather end (median, last), the
wait (median, longest), the U part (median, longest), span; gap: the previous call's last end to this
call's first start (launch, and the fill for ranked calls). The timer advances in ~1 µs steps.
Both ranked sequences take a fresh counter per call (no `sync`), as modules did before session 27: the
gap they show includes the fill that the kept counter (`lowrank.KEPT_COUNTER`) now saves.
Session 27 (`gpu_rank_timeline_s27.json`): the fill ~1.3 µs of gap per call; waits under 1 µs; the U
part at the tiles' end 1.3-1.7 µs for one rank block, 5.4-7.2 on gate|up at rank 144.
Prints a table, ends with one JSON line; writes $OUT/gpu_rank_timeline.json.
    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_rank_timeline.py [--alphas 0.97,0.9]
"""
import argparse
import statistics

import torch
import triton
import triton.language as tl

from gpu_kernels import COPIES, bench, device_bandwidth, finish
from gpu_rank_modes import bounds, build
from gpu_timeline import _smid, _stamp, time_alternately, timed_launch
from rsparse.kernels import lowrank, triton_gemv as tg
from rsparse.kernels.lowrank import _lowrank, _member, _member_z
from rsparse.kernels.tl_common import BB, _store_partial, _tile_acc, gather_grid

FIELDS = 6  # start, mid (z written / gather multiplied), wait over, end, SM, role (1: z program)
CALLS = [("gate|up", (14336, 14336), 4096), ("down", (4096,), 14336)]


@triton.jit
def _timed_ranked(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, at_ptr, zpart_ptr, u_ptr, sync_ptr, log_ptr,
                  B, IN, OUT, LDW, SEG1, SEG2, LDA, RT, ROFF1, ROFF2, NTILE, NZCHUNK, NZ,
                  CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  ZCHUNK: tl.constexpr, RB: tl.constexpr, NZP: tl.constexpr):
    pid = tl.program_id(0)
    t0 = _stamp(pid)
    if pid < NZ:
        _member_z(x_ptr, c_ptr, tau_ptr, at_ptr, zpart_ptr, pid % NZCHUNK, pid // NZCHUNK, B, IN, LDA, RT, ROFF1, ROFF2,
                  ZCHUNK, BB, RB)
        tl.debug_barrier()
        t1 = _stamp(pid)
        done = tl.atomic_add(sync_ptr, 1, sem="release")
        t2 = t1
        t3 = _stamp(done)
        role = 1
    else:
        t = pid - NZ
        pid_n, chunk = t % NTILE, t // NTILE
        acc = _tile_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, pid_n, chunk, B, IN, OUT, LDW, SEG1, SEG2, CHUNK, BB,
                        BLOCK_K, BLOCK_N)
        t1 = _stamp(tl.sum(tl.sum(acc, 1), 0).to(tl.int32, bitcast=True))
        t2 = t1
        nchunk = tl.cdiv(IN, CHUNK)
        p, seg_lo, ra, rb, uoff = _member(pid_n * BLOCK_N, SEG1, SEG2, ROFF1, ROFF2, RT)
        q0 = (nchunk - 1 - chunk) * RB
        if ra + q0 < rb:
            seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
            while seen < NZ:
                seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
            t2 = _stamp(seen)
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _lowrank(acc, zpart_ptr, u_ptr, tl.arange(0, BB), n, n < OUT, B, RT, NZCHUNK, seg_lo, ra, rb, uoff, q0,
                           nchunk * RB, BB, RB, NZP)
        _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)
        t3 = _stamp(tl.sum(tl.sum(acc, 1), 0).to(tl.int32, bitcast=True))
        role = 0
    lp = log_ptr + pid * 6
    tl.store(lp, t0)
    tl.store(lp + 1, t1)
    tl.store(lp + 2, t2)
    tl.store(lp + 3, t3)
    tl.store(lp + 4, _smid().to(tl.int64))
    tl.store(lp + 5, role)


def timed_ranked(x, wt, at, u, cs, tau, cfg, seg1, seg2, roff1, roff2, logs):
    """`lowrank._ranked_gather(..., "one-launch")` with the twin; appends the launch's log to logs."""
    B, IN = x.shape
    OUT, R = wt.shape[1], at.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, x.device)
    ypart = torch.empty(nchunk, B, OUT, dtype=torch.float32, device=x.device)
    members = 1 + (seg1 < OUT) + (seg2 < OUT)
    zc = lowrank.z_chunk(IN, OUT)
    nzchunk = triton.cdiv(IN, zc)
    zpart = torch.empty(nzchunk * B * R, dtype=torch.float32, device=x.device)
    sync = torch.zeros(1, dtype=torch.int32, device=x.device)
    nz = nzchunk * members
    log = torch.zeros((nz + ntile * nchunk) * FIELDS, dtype=torch.int64, device=x.device)
    logs.append(log)
    _timed_ranked[(nz + ntile * nchunk,)](
        x, cs, tau, wt, scratch, ypart, at, zpart, u, sync, log, B, IN, OUT, wt.stride(0), seg1, seg2, at.stride(0), R,
        roff1, roff2, ntile, nzchunk, nz, CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn,
        **dict(lowrank.RANKED_TILES, ZCHUNK=zc), num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart


def capture(fn):
    """fn run once (compile), then captured in a CUDA graph: (graph, output)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def read(logs, fields):
    """Per launch: the records as columns (lists), from the last replay."""
    return [list(zip(*lg.view(-1, fields).cpu().tolist())) for lg in logs]


def med(v):
    return round(statistics.median(v) / 1e3, 2) if v else None


def ranked_rows(recs):
    rows, prev_end = [], None
    for t0, t1, t2, t3, sm, role in recs:
        first = min(t0)
        z = [i for i, r in enumerate(role) if r == 1]
        tiles = [i for i, r in enumerate(role) if r == 0]
        waiting = [i for i in tiles if t2[i] != t1[i]]
        rows.append(dict(
            gap=None if prev_end is None else (first - prev_end) / 1e3, span=(max(t3) - first) / 1e3,
            z_done=(max(t3[i] for i in z) - first) / 1e3, z_programs=len(z), tiles=len(tiles), waiting_tiles=len(waiting),
            gather_end_med=med([t1[i] - first for i in tiles]), gather_end_last=(max(t1[i] for i in tiles) - first) / 1e3,
            wait_med=med([t2[i] - t1[i] for i in waiting]), wait_max=(max(t2[i] - t1[i] for i in waiting) / 1e3) if waiting else None,
            u_med=med([t3[i] - t2[i] for i in waiting]), u_max=(max(t3[i] - t2[i] for i in waiting) / 1e3) if waiting else None,
            max_per_sm=max(sm.count(s) for s in set(sm))))
        prev_end = max(t3)
    return rows


def r0_rows(recs):
    rows, prev_end = [], None
    for t0, t1, t2, sm, cnt in recs:
        first = min(t0)
        rows.append(dict(gap=None if prev_end is None else (first - prev_end) / 1e3, span=(max(t2) - first) / 1e3,
                         gather_end_med=med([b - first for b in t2]), tiles=len(t0),
                         max_per_sm=max(sm.count(s) for s in set(sm))))
        prev_end = max(t2)
    return rows


def summary(rows):
    out = {}
    for k, v in rows[0].items():
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = round(statistics.median(vals), 2) if vals else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0.97,0.9")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    device_bandwidth()
    result = []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        for name, outs, in_f in CALLS:
            x, cs, taus, copies, refs, ranks = build(outs, in_f, args.sparsity, alpha, dt)
            seg, roff = bounds(list(outs)), bounds(ranks)
            c, t = (cs, taus) if len(cs) > 1 else (cs[0], taus[0])
            cfg = tg._group_cfg(*seg, copies[0][0], 0, reduce=False)
            ref = torch.cat(refs, 1)
            logs, logs0 = [], []

            def real():
                return [lowrank._ranked_gather(x, wt, at, u, c, t, cfg, *seg, *roff, "one-launch") for wt, at, u, *_ in copies]

            def stamped():
                return [timed_ranked(x, wt, at, u, c, t, cfg, *seg, *roff, logs) for wt, at, u, *_ in copies]
            gather0 = timed_launch(logs0)

            def parts0(wt):  # the r = 0 gather's partials (chunks, 1, out)
                return torch.empty(triton.cdiv(in_f, cfg["chunk"]), 1, wt.shape[1], dtype=torch.float32, device="cuda")

            def stamped_r0():
                return [gather0(x, wt, c, t, parts0(wt), cfg, *seg) for wt, *_ in copies]
            graphs = {"real": capture(real), "stamped": capture(stamped), "r0 stamped": capture(stamped_r0)}
            del logs[:-COPIES], logs0[:-COPIES]  # the captured launches' logs (the first runs compiled)
            for label, (g, out) in list(graphs.items())[:2]:
                g.replay()
                torch.cuda.synchronize()
                y = out[0].sum(0).float()
                err = ((y - ref).norm() / ref.norm()).item()
                assert torch.isfinite(y).all() and err < 1e-2, (name, label, err)
            times = {k: round(statistics.median(v) / COPIES, 2) for k, v in time_alternately(graphs, 7).items()}
            r0_plain = bench(lambda: [tg._gather(x, wt, c, t, parts0(wt), cfg, *seg) for wt, *_ in copies])
            graphs["stamped"][0].replay()
            graphs["r0 stamped"][0].replay()
            torch.cuda.synchronize()
            ranked = summary(ranked_rows(read(logs, FIELDS)))
            r0 = summary(r0_rows(read(logs0, 5)))
            row = dict(alpha=alpha, call=name, ranks=ranks, us_per_call=times, r0_plain_us=round(r0_plain, 2), ranked=ranked, r0=r0)
            result.append(row)
            print(row, flush=True)
    print("\nµs from the call's first program start (medians over the copies); gap: previous call's end -> this start")
    keys = ("gap", "z_done", "gather_end_med", "gather_end_last", "wait_med", "wait_max", "u_med", "u_max", "span")
    print(f"{'alpha':>5} {'call':>8} {'ranks':>12} " + " ".join(f"{k:>15}" for k in keys) + f" {'r0 gap':>7} {'r0 end med':>10} {'r0 span':>8}")
    for r in result:
        k, z = r["ranked"], r["r0"]
        print(f"{r['alpha']:>5} {r['call']:>8} {str(r['ranks']):>12} " + " ".join(f"{k[x]!s:>15}" for x in keys)
              + f" {z['gap']!s:>7} {z['gather_end_med']!s:>10} {z['span']!s:>8}")
    finish("gpu_rank_timeline.json", {"bench": "gpu_rank_timeline", "rows": result})


if __name__ == "__main__":
    main()
