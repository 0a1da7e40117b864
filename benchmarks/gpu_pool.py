"""The pooled gather again, with contiguous channel offsets (session 20). Run 2 of session 20 timed
session 19's pooled gather (`kernels/pool.py`, removed; code at 9c17e84) 2-3x slower than the
configured gather; run 7 (`gpu_offsets.py`) then showed that the `tl.where`-built offsets it used
cost 0.39-0.63x on their own. Here the same design with offsets that stay contiguous
(`gpu_offsets.limit_acc`): program (tile, chunk) gathers the first CHUNK - POOL channels of its chunk,
then draws tickets from a counter, ticket t < NTILE * NCHUNK being the unit "tile t % NTILE, the last
POOL channels of chunk t // NTILE"; partials in two banks (2 NCHUNK, rows, out); the program that
draws the call's last ticket resets the counter. One member (no groups), r = 0, 50%, batch 1, bf16,
the configured launch parameters, against the configured gather and the "limit" copy of it (the
same kernel code without the pool) on the four Llama-3-8B calls. Each checked against the float32
oracle first, the counter checked back at 0; timed like `gpu_kernels.py`.
Prediction (session 19): if the pool halves the tail (7.4 µs of gate|up's 34.5, 4.0 of down's 20.4),
gate|up ~3 µs and down ~1.5 µs faster per call; no gain on q|k|v and o.
Prints a table, ends with one JSON line, writes $OUT/gpu_pool.json.
`PYTHONPATH=src:benchmarks python3 benchmarks/gpu_pool.py`
"""
import torch
import triton
import triton.language as tl

from gpu_kernels import device_bandwidth, finish, time_grid
from gpu_offsets import configured_case, limit_acc, offsets_partials
from rsparse.kernels.tl_common import BB, _store_partial, gather_grid

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
FRACTIONS = (16, 8, 4)  # pool = chunk / F


@triton.jit
def _pooled_gather(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, ctr_ptr, B, IN, OUT, LDW, NTILE, NCHUNK,
                   CHUNK: tl.constexpr, POOL: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BB)
    tau = tl.load(tau_ptr)
    base = scratch_ptr + (pid_n * NCHUNK + chunk) * CHUNK
    start = chunk * CHUNK
    acc = limit_acc(x_ptr, c_ptr, tau, wt_ptr, base, start, tl.minimum(IN, start + CHUNK - POOL), rows,
                    pid_n * BLOCK_N + tl.arange(0, BLOCK_N), B, IN, OUT, LDW, CHUNK, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)
    nunit = NTILE * NCHUNK
    t = tl.atomic_add(ctr_ptr, 1)
    while t < nunit:
        tile = t % NTILE
        uc = t // NTILE
        tl.debug_barrier()  # every thread is past the previous unit's index loads before they are overwritten
        s = uc * CHUNK + CHUNK - POOL
        acc = limit_acc(x_ptr, c_ptr, tau, wt_ptr, base + CHUNK - POOL, s, tl.minimum(IN, s + POOL), rows,
                        tile * BLOCK_N + tl.arange(0, BLOCK_N), B, IN, OUT, LDW, POOL, BB, BLOCK_K, BLOCK_N)
        _store_partial(ypart_ptr, acc, NCHUNK + uc, tile, B, OUT, BB, BLOCK_N)
        t = tl.atomic_add(ctr_ptr, 1)
    if t == 2 * nunit - 1:  # the call's last ticket: every program has drawn its last one
        tl.atomic_add(ctr_ptr, -2 * nunit)


def pooled_partials(x, wt, col_scale, tau, cfg, pool, counter):
    B, IN = x.shape
    OUT = wt.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, x.device)
    ypart = torch.empty(2 * nchunk, B, OUT, dtype=torch.float32, device=x.device)
    _pooled_gather[(ntile, nchunk)](x, col_scale, tau, wt, scratch, ypart, counter, B, IN, OUT, wt.stride(0), ntile, nchunk,
                                    CHUNK=ch, POOL=pool, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn,
                                    num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart


def main():
    torch.manual_seed(0)
    bw = device_bandwidth()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for out_f, in_f in SHAPES:
        Wts, x, ones, tau, ref, floor_us, cfg, gather = configured_case(out_f, in_f, bw)
        ch = cfg["chunk"]
        cands = ["configured", "limit"] + [ch // f for f in FRACTIONS]

        def call(c, Wt):
            if c == "configured":
                return gather(Wt)
            if c == "limit":
                return offsets_partials(x, Wt, ones, tau, cfg, ch, False)
            return pooled_partials(x, Wt, ones, tau, cfg, c, counter)

        times = time_grid(cands, call, ref, Wts, rep=200, tag=f"{out_f}x{in_f}", result=lambda p: p.sum(0))
        assert counter.item() == 0, "the pooled gather left its counter set"
        row = {"shape": f"{out_f}x{in_f}", "chunk": ch, "floor_us": floor_us,
               **{f"{c if isinstance(c, str) else f'pool_{c}'}_us": times.get(i) for i, c in enumerate(cands)}}
        rows.append(row)
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        del Wts
    finish("gpu_pool.json", {"copy_bw_TBps": bw / 1e12, "rows": rows})


if __name__ == "__main__":
    main()
