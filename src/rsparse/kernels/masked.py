"""A candidate r = 0 gather without compaction (`_masked_gemv`), built for an H200 A/B against the
compacting `_fused_gather_gemv` (session 10; not yet timed on a GPU, used only where a launch
configuration says "masked": True).

Why: before its first weight load, a compacting program loads its x and scale chunk, takes a cumsum,
stores the kept indices to a scratch row, waits at a CTA barrier and loads the indices back, and the
weight addresses depend on those loads; session 5's fit put a fixed ~7 us on every call, the gap
between 58% and 87% of copy bandwidth on the MLP shapes. Here a program walks its chunk in BLOCK_K
steps and loads each step's Wt rows under the rows' keep mask (a masked-off row issues no memory
request, so only kept rows are read, as before): the addresses depend on nothing loaded, and the mask
only on the same step's x block, so the weight loads need no index round trip. Cost: all CHUNK /
BLOCK_K steps are issued at any sparsity, and tl.dot multiplies the dropped rows' zeros.

Output and rules as the compacting gather: float32 partials (chunks, rows, out) that the epilogue or
the consumer sums; keep |x_j| c_j > tau in float32; each row multiplies only its own kept entries of
the rows' union; a group's tile thresholds with its member's tau and scales (boundaries SEG1, SEG2 on
tile boundaries).
"""
import torch
import triton
import triton.language as tl

from .tl_common import BB, _keep, _store_partial


@triton.jit
def _masked_gemv(x_ptr, c_ptr, tau_ptr, wt_ptr, ypart_ptr, B, IN, OUT, LDW, SEG1, SEG2,
                 CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BB)
    n0 = pid_n * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    p = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)  # the tile's member
    tau = tl.load(tau_ptr + p)
    cp = c_ptr + p * IN
    acc = tl.zeros((BB, BLOCK_N), dtype=tl.float32)
    for k0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < IN
        valid = (rows[:, None] < B) & km[None, :]
        xv = tl.load(x_ptr + rows[:, None] * IN + kk[None, :], mask=valid, other=0.0)
        keep = _keep(xv, tl.load(cp + kk, mask=km, other=0.0), tau, valid)
        kept_any = tl.max(keep.to(tl.int32), axis=0) > 0
        w = tl.load(wt_ptr + kk[:, None].to(tl.int64) * LDW + n[None, :], mask=kept_any[:, None] & (n[None, :] < OUT),
                    other=0.0)
        acc += tl.dot(tl.where(keep, xv, 0.0).to(w.dtype), w, input_precision="ieee")
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)


def masked_gather(x, wt, col_scale, tau, ypart, cfg, seg1, seg2):
    """`_masked_gemv` over the whole layer: float32 partials (chunks, rows, out) into ypart."""
    B, IN = x.shape
    OUT = wt.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    if ch % cfg["block_k"]:  # a step past the chunk's end would add the next chunk's rows twice
        raise ValueError(f"masked gather: chunk {ch} is not a multiple of block_k {cfg['block_k']}")
    torch.library.wrap_triton(_masked_gemv)[(triton.cdiv(OUT, bn), triton.cdiv(IN, ch))](
        x, col_scale, tau, wt, ypart, B, IN, OUT, wt.stride(0), seg1, seg2,
        CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart
