"""Can a gather's tail warm L2 with the next gather's weights?

Why: `gpu_timeline.py` (session 16) shows the DRAM mostly idle between two dependent gathers: the last
1.6-7.4 µs of a call run with under 90% of the SMs busy (its tail), then ~4 µs pass before the next
gather's programs start (the epilogue or the consumer's kernel, launches), then each program spends
1.2-1.8 µs compacting before its first weight load. Which rows the next gather keeps is not known
until its input exists, but its weight is: if each program of a gather, once its own partial is
stored, prefetches a share of the next weight into L2 (the first F rows of each of the next call's
chunks, one `cp.async.bulk.prefetch.L2` per row), every program of the next call finds the first
~F / chunk of its kept rows in L2. Half the prefetched rows are wasted, but on DRAM time that was idle.
Session 15 saw a prefetch launched as its own kernel cost more than it saved (`gpu_l2_prefetch.py`);
here no launch is added. Prediction: >= 3% off the chain at F = 1/8 of a chunk.

The chain of `gpu_timeline.py` (LAYERS layers of Llama-3-8B's q|k|v, o, gate|up, down as the eager
path runs them, batch 1, 50% kept, r = 0, every weight read once per chain), with the gathers run by a
twin that prefetches at its end (`_gather_pf`: `_fused_gather_gemv` and then the prefetch), at
F = 0 (the twin, no prefetch), 1/8, 1/4 and 1/2 of each chunk's rows; also "lines" (one
`prefetch.global.L2::evict_last` per 128-byte line) at 1/4. Each variant captured in one CUDA graph,
replayed alternately (median of repeats), its output checked bit for bit against the real kernels'.
Prints a table, ends with one JSON line; writes $OUT/gpu_tail_prefetch.json.
`cd benchmarks && PYTHONPATH=../src python3 gpu_tail_prefetch.py`

Session 16 (`gpu_tail_prefetch_s16.json`): refuted. Real kernels 728.2 µs per chain, the twin without
prefetch 728.8; bulk prefetch of 1/8, 1/4, 1/2 of each chunk 818.5, 984.2, 1329.8; lines at 1/4 924.2.
The chain slows in proportion to the bytes prefetched, as if none came back as L2 hits. Not built.
"""
import json
import os
import statistics

import torch
import triton
import triton.language as tl

from gpu_timeline import H, LAYERS, calls, capture_chains, config, layer_weights, run_chain, time_alternately
from rsparse.gpubench import copy_bandwidth
from rsparse.kernels.tl_common import BB, _store_partial, _tile_acc, gather_grid

VARIANTS = {"twin": ("bulk", 0.0), "bulk 1/8": ("bulk", 1 / 8), "bulk 1/4": ("bulk", 1 / 4), "bulk 1/2": ("bulk", 1 / 2),
            "lines 1/4": ("lines", 1 / 4)}


@triton.jit
def _gather_pf(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, B, IN, OUT, LDW, SEG1, SEG2,
               pf_ptr, PF_IN, PF_ROWBYTES, PF_CH, PF_F,
               CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
               PER: tl.constexpr, LINES: tl.constexpr):
    """`_fused_gather_gemv`, then this program's share of the next weight's prefetch: rows
    [c * PF_CH, c * PF_CH + PF_F) of every next chunk c, the q-th of them (q = program + k * programs)
    one bulk prefetch of its PF_ROWBYTES bytes (LINES: its 128-byte lines, PER per program)."""
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    acc = _tile_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, pid_n, chunk, B, IN, OUT, LDW, SEG1, SEG2, CHUNK, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    p = chunk * tl.num_programs(0) + pid_n
    base = pf_ptr.to(tl.pointer_type(tl.int8))
    q = p + nprog * tl.arange(0, PER).to(tl.int64)
    if LINES:
        per_row = PF_ROWBYTES // 128
        row_i = q // per_row
        row = (row_i // PF_F) * PF_CH + row_i % PF_F
        ok = (row_i < tl.cdiv(PF_IN, PF_CH) * PF_F) & (row < PF_IN)
        addr = (base + tl.where(ok, row * PF_ROWBYTES + (q % per_row) * 128, 0)).to(tl.int64)
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                                  "=r,l,r", [addr, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        row = (q // PF_F) * PF_CH + q % PF_F
        ok = (q < tl.cdiv(PF_IN, PF_CH) * PF_F) & (row < PF_IN)
        addr = (base + tl.where(ok, row * PF_ROWBYTES, 0)).to(tl.int64)
        size = tl.where(ok, PF_ROWBYTES, 0).to(tl.int32)
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                                  "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetching_gather(nexts, mode, frac):
    """A stand-in for `triton_gemv._gather` running `_gather_pf` with the next call's weight (nexts:
    {Wt data_ptr: (next Wt, next chunk)})."""
    def gather(x, wt, col_scale, tau, ypart, cfg, seg1, seg2):
        B, IN = x.shape
        OUT = wt.shape[1]
        ch, bn = cfg["chunk"], cfg["block_n"]
        ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, x.device)
        nwt, nch = nexts[wt.data_ptr()]
        rowbytes = nwt.stride(0) * nwt.element_size()
        f = int(nch * frac)
        units = triton.cdiv(nwt.shape[0], nch) * f * (rowbytes // 128 if mode == "lines" else 1)
        per = triton.next_power_of_2(max(1, triton.cdiv(units, ntile * nchunk)))
        _gather_pf[(ntile, nchunk)](x, col_scale, tau, wt, scratch, ypart, B, IN, OUT, wt.stride(0), seg1, seg2,
                                    nwt, nwt.shape[0] if f else 0, rowbytes, nch, max(f, 1),
                                    CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, PER=per if f else 1,
                                    LINES=mode == "lines", num_warps=cfg["warps"], num_stages=cfg["stages"])
        return ypart
    return gather


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}  L2 {props.L2_cache_size / 2**20:.0f} MiB  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    layers = [layer_weights(gen) for _ in range(LAYERS)]
    x0 = torch.distributions.Laplace(0.0, 1.0).sample((1, H)).to("cuda", torch.bfloat16)
    nbytes = []
    _, taus = run_chain(layers, x0, None, nbytes)
    seq = [(wt, config(wt, seg, glu)["chunk"]) for wts in layers for wt, seg, glu in calls(wts)]
    nexts = {wt.data_ptr(): seq[(i + 1) % len(seq)] for i, (wt, _) in enumerate(seq)}
    gathers = {"real": None, **{name: prefetching_gather(nexts, mode, frac) for name, (mode, frac) in VARIANTS.items()}}
    graphs = capture_chains(layers, x0, taus, gathers)
    times = time_alternately(graphs, 9)
    for g, _ in graphs.values():
        g.replay()
    torch.cuda.synchronize()
    base = statistics.median(times["real"])
    total = sum(nbytes)
    res = {}
    print(f"{'variant':>10} {'µs/chain':>9} {'x real':>7} {'copy':>6} {'equal':>6}  spread")
    for k, (g, out) in graphs.items():
        us = statistics.median(times[k])
        res[k] = dict(us_per_chain=round(us, 1), vs_real=round(base / us, 4), copy_frac=round(total / (us * 1e-6) / bw, 3),
                      bitwise_equal=bool(torch.equal(out, graphs["real"][1])), spread=[round(min(times[k]), 1), round(max(times[k]), 1)])
        r = res[k]
        print(f"{k:>10} {r['us_per_chain']:>9} {r['vs_real']:>7} {r['copy_frac']:>6} {str(r['bitwise_equal']):>6}  {r['spread']}")
    result = dict(bench="gpu_tail_prefetch", device=props.name, l2_mib=props.L2_cache_size / 2**20, copy_tb_s=round(bw / 1e12, 3),
                  layers=LAYERS, bytes=total, variants=res)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_tail_prefetch.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
