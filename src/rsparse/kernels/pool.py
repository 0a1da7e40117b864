"""A gather whose chunk tails go to a shared pool: an experiment against the gather's uneven end, not
on the default path (session 19; `benchmarks/gpu_pool.py` times it against the configured gather).

The r = 0 gather (`triton_gemv._fused_gather_gemv`) gives each program one (output tile, input chunk)
of the layer. Its programs start together and, with equal work, end up to 6 µs apart (session 16's
timeline: the streaming rate differs from SM to SM), so a call waits for the slowest: the tail was
7.4 µs of gate|up's 34.5. A work queue of small units would even that out, but every unit pays a
dependent index -> row chain (~1.5 µs) first (session 18's costing). Here most of the work stays
static and only a little is pooled:
- program (tile, chunk) compacts and gathers the first STATIC channels of its chunk, as before;
- then it draws tickets from a counter: ticket t < NTILE * NCHUNK is the unit "tile t % NTILE, the
  last POOL channels of chunk t // NTILE", which it compacts (into the unused end of its own scratch
  row) and gathers; a program that streams fast takes several units, a slow one none.
Partials come in two banks, (2 NCHUNK, rows, out): bank 0 the static shares, bank 1 the pooled ones
(every (tile, chunk) has exactly one unit, so every partial is written); their sum over dim 0 is the
product, as for the configured gather (`triton_gemv.sum_partials`).

The counter needs no fill launch: each program stops at its first ticket >= NUNIT, so a call draws
exactly 2 NUNIT tickets (NUNIT programs), and the program that draws the last one subtracts them all:
the counter is 0 again when the call ends, also across CUDA graph replays.
"""
import torch
import triton
import triton.language as tl

from .tl_common import BB, _store_partial, _tile_channels_acc


@triton.jit
def _pooled_gather_gemv(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, ctr_ptr, B, IN, OUT, LDW, SEG1, SEG2,
                        NTILE, NCHUNK, CHUNK: tl.constexpr, STATIC: tl.constexpr, POOL: tl.constexpr,
                        BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    base = scratch_ptr + (pid_n * NCHUNK + chunk) * CHUNK
    lane = tl.arange(0, CHUNK)
    offs = tl.where(lane < STATIC, chunk * CHUNK + lane, IN)  # the pooled lanes: IN, never kept here
    acc = _tile_channels_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, base, pid_n, offs, B, IN, OUT, LDW, SEG1, SEG2, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)
    nunit = NTILE * NCHUNK
    t = tl.atomic_add(ctr_ptr, 1)
    while t < nunit:
        tile = t % NTILE
        unit_chunk = t // NTILE
        tl.debug_barrier()  # every thread is past the previous unit's index loads before they are overwritten
        acc = _tile_channels_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, base + STATIC, tile,
                                 unit_chunk * CHUNK + STATIC + tl.arange(0, POOL),
                                 B, IN, OUT, LDW, SEG1, SEG2, BB, BLOCK_K, BLOCK_N)
        _store_partial(ypart_ptr, acc, NCHUNK + unit_chunk, tile, B, OUT, BB, BLOCK_N)
        t = tl.atomic_add(ctr_ptr, 1)
    if t == 2 * nunit - 1:  # the call's last ticket: every program has drawn its last one
        tl.atomic_add(ctr_ptr, -2 * nunit)


def pooled_partials(x: torch.Tensor, wt: torch.Tensor, col_scale: torch.Tensor, tau: torch.Tensor, cfg: dict, pool: int,
                    counter: torch.Tensor, seg1: int | None = None, seg2: int | None = None,
                    ypart: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 partials (2 * chunks, rows, out) of x (1..8 rows) times the kept rows of wt (in, out):
    cfg as `triton_gemv.config_for` gives (chunk, block_k, block_n, warps, stages), `pool` channels at
    the end of every chunk pooled (a power of 2 below the chunk), `counter` an int32 tensor of one
    zero that this call leaves zero (one per stream of calls); seg1/seg2 a group's member boundaries."""
    B, IN = x.shape
    OUT = wt.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    if not 0 < pool < ch or pool & (pool - 1):
        raise ValueError(f"pool must be a power of 2 below the chunk ({ch}), got {pool}")
    if counter.dtype != torch.int32 or counter.numel() != 1:
        raise ValueError("counter must be an int32 tensor of one element")
    nchunk, ntile = triton.cdiv(IN, ch), triton.cdiv(OUT, bn)
    seg1 = OUT if seg1 is None else seg1
    seg2 = OUT if seg2 is None else seg2
    scratch = torch.empty(ntile * nchunk * ch, dtype=torch.int32, device=x.device)
    if ypart is None:
        ypart = torch.empty(2 * nchunk, B, OUT, dtype=torch.float32, device=x.device)
    _pooled_gather_gemv[(ntile, nchunk)](
        x, col_scale, tau, wt, scratch, ypart, counter, B, IN, OUT, wt.stride(0), seg1, seg2, ntile, nchunk,
        CHUNK=ch, STATIC=ch - pool, POOL=pool, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart
