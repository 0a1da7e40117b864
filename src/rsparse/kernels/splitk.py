"""v7: the r = 0 decode product in one launch per call (`_splitk_gemv`), measured faster than the
2-launch path (gather + epilogue, `triton_gemv`) only on 4096-wide shapes (docs/perf-gpu.md,
session 5), so `triton_gemv.TUNED` chooses per shape.

Grid (output tiles, SPLITS ranges of whole chunks over the input channels); each program compacts
and gathers its range, and for SPLITS > 1 the program that draws a tile's last ticket (a counter per
tile, acquire-release) sums the float32 partials in split order (deterministic), finishes the tile
(bias, SiLU(gate) * up for a gate|up pair) and zeroes the counter again, so modules keep theirs
(`tile_locks`) instead of a zero-fill launch per call.
"""
import torch
import triton
import triton.language as tl

from .counters import check_counters, counters
from .tl_common import BB, _compact_chunk, _gather_rows, _silu_mul


@triton.jit
def _member_range(x_ptr, c_ptr, tau, wt_ptr, base, k_lo, k_hi, rows, n, B, IN, OUT, LDW,
                  CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over the kept channels j in [k_lo, k_hi) of x[:, j] * Wt[j, n], one chunk at a time: the
    chunk's kept indices compacted into the scratch row `base`, then only their rows gathered."""
    acc = tl.zeros((BB, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, CHUNK):
        tl.debug_barrier()  # every warp has read the previous chunk's indices before they are overwritten
        cnt = _compact_chunk(x_ptr, c_ptr, tau, base, k0 + tl.arange(0, CHUNK), rows, B, IN)
        acc += _gather_rows(x_ptr, c_ptr, tau, wt_ptr, base, cnt, rows, n, B, IN, OUT, LDW, BB, BLOCK_K, BLOCK_N)
    return acc


@triton.jit
def _finish(acc, acc_u, b_ptr, y_ptr, rows, n, B, OUT, HALF, GLU: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Bias, then the output tile in the model dtype: y (B, OUT), or SiLU(gate) * up (B, HALF)."""
    dt = y_ptr.dtype.element_ty
    if GLU:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < HALF, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_ptr + HALF + n, mask=n < HALF, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * HALF + n[None, :], _silu_mul(acc, acc_u, dt).to(dt),
                 mask=(rows[:, None] < B) & (n[None, :] < HALF))
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < OUT, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * OUT + n[None, :], acc.to(dt), mask=(rows[:, None] < B) & (n[None, :] < OUT))


@triton.jit
def _splitk_gemv(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, lock_ptr, b_ptr, y_ptr,
                 B, IN, OUT, LDW, SEG1, SEG2, K_PER,
                 CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLITS: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr):
    """v7, one launch per call (r = 0): grid (output tiles, SPLITS ranges of K_PER input channels).
    A program loops over its range's chunks (compact, gather). SPLITS = 1: it owns its tile and
    writes y directly. SPLITS > 1: it stores a float32 partial, takes a ticket from the tile's
    counter (zero at the launch), and the program that draws the last ticket sums the SPLITS partials
    (from L2, in split order: deterministic) and finishes the tile: no second launch, no atomics on
    the data. Groups as in `_fused_gather_gemv` (SEG1, SEG2); GLU: a gate|up pair (SEG1 = HALF),
    each program computes a gate tile and the matching up tile and writes SiLU(gate) * up."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BB)
    n0 = pid_n * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, IN)
    base = scratch_ptr + (pid_n * SPLITS + pid_k) * CHUNK
    p = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
    acc = _member_range(x_ptr, c_ptr + p * IN, tl.load(tau_ptr + p), wt_ptr, base, k_lo, k_hi, rows, n, B, IN, OUT, LDW,
                        CHUNK, BB, BLOCK_K, BLOCK_N)
    if GLU:
        acc_u = _member_range(x_ptr, c_ptr + IN, tl.load(tau_ptr + 1), wt_ptr, base, k_lo, k_hi, rows, SEG1 + n, B, IN, OUT,
                              LDW, CHUNK, BB, BLOCK_K, BLOCK_N)
    else:
        acc_u = acc
    if SPLITS == 1:
        _finish(acc, acc_u, b_ptr, y_ptr, rows, n, B, OUT, SEG1, GLU, HAS_BIAS)
    else:
        m = (rows[:, None] < B) & (n[None, :] < OUT)
        part = ypart_ptr + rows[:, None] * OUT + n[None, :]
        tl.store(part + pid_k * BB * OUT, acc, mask=m)
        if GLU:
            tl.store(part + pid_k * BB * OUT + SEG1, acc_u, mask=m)
        tl.debug_barrier()  # the whole partial is written before the ticket is taken (release)
        ticket = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLITS - 1:
            acc = tl.zeros((BB, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BB, BLOCK_N), dtype=tl.float32)
            for k in tl.static_range(SPLITS):  # .cg: the other programs' partials, from L2
                acc += tl.load(part + k * BB * OUT, mask=m, other=0.0, cache_modifier=".cg")
                if GLU:
                    acc_u += tl.load(part + k * BB * OUT + SEG1, mask=m, other=0.0, cache_modifier=".cg")
            if not GLU:
                acc_u = acc
            _finish(acc, acc_u, b_ptr, y_ptr, rows, n, B, OUT, SEG1, GLU, HAS_BIAS)
            tl.store(lock_ptr + pid_n, 0)  # every range has drawn its ticket: zero again for the next call


def launch_splitk(x, wt, col_scale, tau, bias, cfg, y, seg1, seg2, glu, locks=None):
    """One `_splitk_gemv` launch: cfg["splits"] ranges of whole chunks over the input channels; locks:
    the caller's tile counters (zeroed once, left zeroed by every call; `triton_gemv.tile_locks`), or
    None for fresh ones (a zero-fill launch per call)."""
    B, IN = x.shape
    OUT, LDW = wt.shape[1], wt.stride(0)
    ch, bn = cfg["chunk"], cfg["block_n"]
    k_per = triton.cdiv(triton.cdiv(IN, cfg["splits"]), ch) * ch
    splits = triton.cdiv(IN, k_per)  # no empty ranges
    ntile = triton.cdiv(OUT // 2 if glu else OUT, bn)
    scratch = torch.empty(ntile * splits * ch, dtype=torch.int32, device=x.device)
    ypart = torch.empty(splits * BB * OUT if splits > 1 else 1, dtype=torch.float32, device=x.device)
    if splits == 1:
        locks = scratch  # one range per tile: no tickets (the pointer is unused)
    elif locks is None:
        locks = counters(ntile, x.device)
    else:
        check_counters(locks, ntile, "tile counters", str(ntile), x.device, "triton_gemv.tile_locks")
    torch.library.wrap_triton(_splitk_gemv)[(ntile, splits)](
        x, col_scale, tau, wt, scratch, ypart, locks, bias if bias is not None else y, y, B, IN, OUT, LDW, seg1, seg2, k_per,
        CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, SPLITS=splits, GLU=glu, HAS_BIAS=bias is not None,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    return y
