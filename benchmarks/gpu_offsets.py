"""Two session-20 experiments lost big, and both built a program's channel offsets with `tl.where`
(lanes past a limit sent to IN): the pooled gather (2-3x slower) and the narrowed channel ranges
(clen 1792: 0.63x). Is that construct itself the cost? The configured r = 0 gather
(`triton_gemv._gather`) against a copy of it (one member, no groups) whose compaction builds its
offsets either way:
- "where": offs = where(lane < CLEN, chunk * CLEN + lane, IN), loads masked by offs < IN;
- "limit": offs = chunk * CLEN + lane (contiguous), loads masked by offs < min(IN, (chunk + 1) CLEN).
With CLEN = CHUNK both compute exactly what the configured gather does; down (4096x14336) is also run
with CLEN = 1792 (8 ranges, 256 programs: the balanced grid of run 5) through "limit".
Each variant is checked against the float32 oracle (the sum of its partials) first; timed like
`gpu_kernels.py`. Prints a table, ends with one JSON line, writes $OUT/gpu_offsets.json.
`PYTHONPATH=src:benchmarks python3 benchmarks/gpu_offsets.py`
"""
import torch
import triton
import triton.language as tl

from gpu_kernels import device_bandwidth, finish, oracle_case50, time_grid
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.tl_common import BB, _compact_chunk, _gather_rows, _keep, _store_partial

SHAPES = [(6144, 4096), (28672, 4096), (4096, 14336)]


@triton.jit
def limit_acc(x_ptr, c_ptr, tau, wt_ptr, base, start, lim, rows, n, B, IN, OUT, LDW, LANES: tl.constexpr,
              BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gather over channels [start, lim) (at most LANES), their offsets contiguous ("limit"), its
    kept indices compacted at `base`: float32 (BB, BLOCK_N) tile of output columns n."""
    offs = start + tl.arange(0, LANES)
    valid = (rows[:, None] < B) & (offs[None, :] < lim)
    xc = tl.load(x_ptr + rows[:, None] * IN + offs[None, :], mask=valid, other=0.0)
    cc = tl.load(c_ptr + offs, mask=offs < lim, other=0.0)
    keep_any = tl.max(_keep(xc, cc, tau, valid).to(tl.int32), axis=0)
    tl.store(base + tl.cumsum(keep_any, axis=0) - 1, offs, mask=keep_any > 0)
    tl.debug_barrier()
    return _gather_rows(x_ptr, c_ptr, tau, wt_ptr, base, tl.sum(keep_any, axis=0), rows, n, B, IN, OUT, LDW, BB, BLOCK_K,
                        BLOCK_N)


@triton.jit
def _offsets_gather(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, B, IN, OUT, LDW, CHUNK: tl.constexpr,
                    CLEN: tl.constexpr, WHERE: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BB)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tau = tl.load(tau_ptr)
    base = scratch_ptr + (pid_n * tl.cdiv(IN, CLEN) + chunk) * CHUNK
    if WHERE:
        lane = tl.arange(0, CHUNK)
        offs = tl.where(lane < CLEN, chunk * CLEN + lane, IN)
        cnt = _compact_chunk(x_ptr, c_ptr, tau, base, offs, rows, B, IN)  # the configured gather's compaction
        acc = _gather_rows(x_ptr, c_ptr, tau, wt_ptr, base, cnt, rows, n, B, IN, OUT, LDW, BB, BLOCK_K, BLOCK_N)
    else:
        acc = limit_acc(x_ptr, c_ptr, tau, wt_ptr, base, chunk * CLEN, tl.minimum(IN, chunk * CLEN + CLEN), rows, n, B, IN,
                        OUT, LDW, CHUNK, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)


def offsets_partials(x, wt, col_scale, tau, cfg, clen, where):
    B, IN = x.shape
    OUT = wt.shape[1]
    nchunk, ntile = triton.cdiv(IN, clen), triton.cdiv(OUT, cfg["block_n"])
    scratch = torch.empty(ntile * nchunk * cfg["chunk"], dtype=torch.int32, device=x.device)
    ypart = torch.empty(nchunk, B, OUT, dtype=torch.float32, device=x.device)
    _offsets_gather[(ntile, nchunk)](x, col_scale, tau, wt, scratch, ypart, B, IN, OUT, wt.stride(0), CHUNK=cfg["chunk"],
                                     CLEN=clen, WHERE=where, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=cfg["block_n"],
                                     num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart


def configured_case(out_f: int, in_f: int, bw: float):
    """`oracle_case50` with the shape's configured r = 0 gather as compiled steps launch it:
    (Wts, x, ones, tau, ref, floor_us, cfg, gather), gather(Wt) returning its partials."""
    Wts, x, ones, tau, ref, floor_us = oracle_case50(out_f, in_f, bw)
    cfg = tg.config_for(out_f, 0, in_f, reduce=False)
    parts = torch.empty(triton.cdiv(in_f, cfg["chunk"]), 1, out_f, device="cuda")
    return Wts, x, ones, tau, ref, floor_us, cfg, lambda Wt: tg._gather(x, Wt, ones, tau, parts, cfg, out_f, out_f)


def main():
    torch.manual_seed(0)
    bw = device_bandwidth()
    rows = []
    for out_f, in_f in SHAPES:
        Wts, x, ones, tau, ref, floor_us, cfg, gather = configured_case(out_f, in_f, bw)
        ch = cfg["chunk"]
        cands = [("configured", ch), ("where", ch), ("limit", ch)] + ([("limit", 1792)] if (out_f, in_f) == (4096, 14336) else [])

        def call(c, Wt):
            if c[0] == "configured":
                return gather(Wt)
            return offsets_partials(x, Wt, ones, tau, cfg, c[1], c[0] == "where")

        times = time_grid(cands, call, ref, Wts, rep=200, tag=f"{out_f}x{in_f}", result=lambda p: p.sum(0))
        for i, (name, clen) in enumerate(cands):
            us = times.get(i)
            row = {"shape": f"{out_f}x{in_f}", "variant": name, "clen": clen, "floor_us": floor_us, "us": us,
                   "vs_configured": times[0] / us if us and times.get(0) else None}
            rows.append(row)
            print(f"{row['shape']:>11}  {name:>10}  clen {clen:5d}  {us if us else float('nan'):6.2f} us  "
                  f"{100 * floor_us / us if us else float('nan'):5.1f}% of copy  x{row['vs_configured'] or float('nan'):.3f}",
                  flush=True)
        del Wts
    finish("gpu_offsets.json", {"copy_bw_TBps": bw / 1e12, "rows": rows})


if __name__ == "__main__":
    main()
