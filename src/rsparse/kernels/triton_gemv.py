"""Triton decode kernels for RSparseLinear (rows <= 8), checked against `rsparse_linear_ref`.

Layout: the module stores Wt = W^T (in, out) so a kept input channel j is one contiguous row
Wt[j, :]; the rank terms' At = A^T (in, r) and U (out, r) are in `lowrank.py`. The r = 0 path (2
launches; 1 under torch.compile):
1. `_fused_gather_gemv`: grid (out tiles, chunks); each program compacts its chunk's kept channel
   indices (|x_j| c_j > tau for any row; `tl_common`) into a private scratch row, then loops over
   those Wt rows only (every load is useful) and writes a float32 partial ypart[chunk] (chunks, rows,
   out).
2. `_epilogue`: y = sum_chunks ypart + b, cast to the model dtype (`_glu_epilogue` for a gate|up
   group: SiLU(gate) * up, the MLP activation, in the same pass). Under torch.compile it is skipped:
   `rsparse_partials` returns the partials and inductor sums them inside the consumer's kernel.
Rank terms (`RANK_TERMS`): by default ("one-launch") the gather launch's first programs write the
low-rank input partials z and its tiles, once a counter says z is complete, add z @ U^T to their
partials (`lowrank._ranked_gather_gemv`; 1 launch, its counter the caller's `locks[0]`, left zeroed;
the partials path under torch.compile); "gather" computes z in a launch of its own before (`_group_z`), "epilogue" adds the
U product in the epilogue (3 launches). The mode is an argument of the ops (`rank_terms`),
never a global read inside them: a compiled graph records it, so inductor's and AOTAutograd's caches
key on it (session 8's end-to-end A/B read a global inside the op, hit the cache of the first mode
compiled and timed "gather" under every label).
`_select` + `_gather_gemv` is session 1's 3-launch form (compaction in its own launch), kept as a
tested variant. Partials instead of atomics on the data: deterministic, no zero-filled outputs, and
bf16/fp16 never need atomics. For batch > 1 the gathered rows are the union of the rows' kept
channels and each row multiplies only its own kept entries, so results equal the per-row oracle. Wt
may be a column slice of a wider matrix (row stride LDW): projections that read the same input
(q|k|v, gate|up) are stored side by side and run as one call (`rsparse_group_gemv`; a tile belongs to
one member and thresholds with that member's tau). The one-launch r = 0 variant chosen per shape by
TUNED is in `splitk.py`; the TEAL-style baseline the benchmarks compare against is in `teal.py`.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .lowrank import _group_z_launch, _lowrank, _member, _rank_block, _ranked_gather, _z_chunk
from .counters import counters
from .splitk import launch_splitk
from .tl_common import BB, gather_grid, _gather_rows, _keep, _silu_mul, _store_partial, _sum_partials, _tile_acc

CHUNK = 256


@triton.jit
def _select(x_ptr, c_ptr, tau_ptr, at_ptr, idx_ptr, cnt_ptr, zpart_ptr, B, IN, R, LDA,
            CHUNK: tl.constexpr, BB: tl.constexpr, RB: tl.constexpr, HAS_R: tl.constexpr):
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rows = tl.arange(0, BB)
    valid = (rows[:, None] < B) & (offs[None, :] < IN)
    x = tl.load(x_ptr + rows[:, None] * IN + offs[None, :], mask=valid, other=0.0)
    c = tl.load(c_ptr + offs, mask=offs < IN, other=0.0)
    tau = tl.load(tau_ptr)
    keep = _keep(x, c, tau, valid)
    keep_any = tl.max(keep.to(tl.int32), axis=0)
    pos = tl.cumsum(keep_any, axis=0) - 1
    tl.store(idx_ptr + chunk * CHUNK + pos, offs, mask=keep_any > 0)
    tl.store(cnt_ptr + chunk, tl.sum(keep_any, axis=0))
    if HAS_R:
        _z_chunk(x, keep, valid, at_ptr, offs, zpart_ptr + chunk * B * R, rows, B, LDA, R, 0, R, RB)


@triton.jit
def _gather_gemv(x_ptr, c_ptr, tau_ptr, wt_ptr, idx_ptr, cnt_ptr, ypart_ptr, B, IN, OUT, LDW,
                 CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BB)
    cnt = tl.load(cnt_ptr + chunk)
    tau = tl.load(tau_ptr)
    acc = _gather_rows(x_ptr, c_ptr, tau, wt_ptr, idx_ptr + chunk * CHUNK, cnt, rows, n, B, IN, OUT, LDW, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)


@triton.jit
def _fused_gather_gemv(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, B, IN, OUT, LDW, SEG1, SEG2,
                       CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_select`'s compaction done inside each program (x chunk re-read from L2, indices through a
    private scratch row and a CTA barrier): one launch fewer, for the r = 0 path. Also serves a group
    of up to 3 projections reading the same x with Wt side by side (q|k|v, gate|up): output columns
    [0, SEG1) use threshold/scales 0, [SEG1, SEG2) 1, [SEG2, OUT) 2 (c is (P, IN), tau (P,)); member
    boundaries are multiples of BLOCK_N, so a program's tile belongs to one member."""
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    acc = _tile_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, pid_n, chunk, B, IN, OUT, LDW, SEG1, SEG2, CHUNK, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)


@triton.jit
def _epilogue(ypart_ptr, zpart_ptr, u_ptr, b_ptr, y_ptr, B, OUT, RT, NCHUNK, NZCHUNK, SEG1, SEG2, ROFF1, ROFF2,
              BB: tl.constexpr, BLOCK_N: tl.constexpr, RB: tl.constexpr, HAS_R: tl.constexpr, HAS_BIAS: tl.constexpr,
              NCP: tl.constexpr, NZP: tl.constexpr):
    """y = sum of the chunks' partials + each member's low-rank term + bias, in the model dtype (one
    module: SEG1 = SEG2 = OUT, ROFF1 = ROFF2 = RT = r)."""
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BB)
    m = (rows[:, None] < B) & (n[None, :] < OUT)
    acc = _sum_partials(ypart_ptr, rows, n, n < OUT, B, OUT, 0, NCHUNK, BB, BLOCK_N, NCP, "")
    if HAS_R:
        p, seg_lo, ra, rb, uoff = _member(pid_n * BLOCK_N, SEG1, SEG2, ROFF1, ROFF2, RT)
        acc = _lowrank(acc, zpart_ptr, u_ptr, rows, n, n < OUT, B, RT, NZCHUNK, seg_lo, ra, rb, uoff, 0, RB, BB, RB, NZP)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < OUT, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * OUT + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_epilogue(ypart_ptr, zpart_ptr, u_ptr, b_ptr, y_ptr, B, OUT, HALF, RT, ROFF1, NCHUNK, NZCHUNK,
                  BB: tl.constexpr, BLOCK_N: tl.constexpr, RB: tl.constexpr, HAS_R: tl.constexpr, HAS_BIAS: tl.constexpr,
                  NCP: tl.constexpr, NZP: tl.constexpr):
    """y = SiLU(gate) * up for a gate|up group (gate columns [0, HALF), up [HALF, OUT); gate's rank
    columns [0, ROFF1), up's [ROFF1, RT)): the MLP's activation in the epilogue, so the group writes
    (B, HALF) once instead of (B, OUT) and two elementwise launches. Rounded like the unfused module
    path (each member's output, then SiLU, then the product, in the model dtype), so both paths agree
    to the last bit almost always."""
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BB)
    m = (rows[:, None] < B) & (n[None, :] < HALF)
    g = _sum_partials(ypart_ptr, rows, n, n < HALF, B, OUT, 0, NCHUNK, BB, BLOCK_N, NCP, "")
    u = _sum_partials(ypart_ptr + HALF, rows, n, n < HALF, B, OUT, 0, NCHUNK, BB, BLOCK_N, NCP, "")
    if HAS_R:
        # gate: columns [0, HALF), rank columns [0, ROFF1), its U first; up: [HALF, OUT), [ROFF1, RT), its U
        # after gate's. Spelled out, not _member(0, ...): torch's mutation analysis traces kernels with the
        # scalar arguments as constants, where (0 >= HALF) is a Python bool and tracing fails; inductor then
        # assumed every input mutated and copied them on every call (found in session 6's logs)
        g = _lowrank(g, zpart_ptr, u_ptr, rows, n, n < HALF, B, RT, NZCHUNK, 0, 0, ROFF1, 0, 0, RB, BB, RB, NZP)
        u = _lowrank(u, zpart_ptr, u_ptr, rows, HALF + n, n < HALF, B, RT, NZCHUNK, HALF, ROFF1, RT, HALF * ROFF1, 0, RB, BB, RB,
                     NZP)
    if HAS_BIAS:
        g += tl.load(b_ptr + n, mask=n < HALF, other=0.0).to(tl.float32)[None, :]
        u += tl.load(b_ptr + HALF + n, mask=n < HALF, other=0.0).to(tl.float32)[None, :]
    dt = y_ptr.dtype.element_ty
    tl.store(y_ptr + rows[:, None] * HALF + n[None, :], _silu_mul(g, u, dt).to(dt), mask=m)


# The gather's launch configuration from the shape's weight count n = out * in (H200, bf16, batch 1,
# 50%; docs/perf-gpu.md session 12, `benchmarks/gpu_gather_grid.py`: 27 configurations on 22 shapes of
# Llama-3-8B, Llama-2-7B, Llama-3.2-1B/3B and Llama-2-13B, members and fused group widths): 128-row K
# steps everywhere (the best on all 22; 10% faster than the 64-row configurations before it in the
# median, 1.6x on 1024x4096: half the loop steps, each a dependent index -> row load chain);
# 64-wide output tiles below 2^25 weights, 128 from there; 512-channel chunks up to 2^22 weights,
# 2048 from 56 * 2^20 (14336x4096; at 48 * 2^20, below it, 1024 was best or within 0.5%). This rule
# picks the grid's best on 21 of the 22 shapes, within 0.5% (16384x3072); the 22nd is in TUNED.
# In-sample: read off that run.
CONFIG = {"chunk": 1024, "block_k": 128, "block_n": 64, "warps": 4, "stages": 3, "fused": True}


def _rule(out_f: int, in_f: int | None) -> dict:
    n = out_f * (out_f if in_f is None else in_f)  # no input width given: taken as square
    if n <= 2**22:
        return dict(CONFIG, chunk=512)
    if n < 2**25:
        return dict(CONFIG)
    return dict(CONFIG, block_n=128, chunk=2048 if n >= 56 * 2**20 else 1024)


# (out, in) -> a configuration measured faster for that shape (H200, bf16, batch 1, 50%): the one-launch
# split kernel (`splits`, v7, gpu_kernels_v7.json) for eager r = 0 calls of the two 4096-wide Llama-3-8B
# shapes, faster than the gather + epilogue of session 5 (not yet timed against the rule's 128-row gather;
# compiled steps and calls with rank terms run the gather alone, with the rule's configuration, through
# config_for(reduce=False)); Llama-3-8B's gate|up group (gpu_gather_grid_s12.json: 35.6 us vs the rule's 36.4)
TUNED: dict = {
    (4096, 4096): dict(chunk=1024, block_k=128, block_n=64, warps=4, stages=4, splits=4),  # v7 12.7 us vs v5 13.8
    (6144, 4096): dict(chunk=1024, block_k=128, block_n=64, warps=4, stages=3, splits=4),  # v7 14.2 us vs v5 16.0
    (28672, 4096): dict(chunk=2048, block_k=128, block_n=256, warps=8, stages=2, fused=True),
}


def load_tuned(best: dict) -> None:
    """Install per-shape configurations {"OUTxIN": cfg} (from benchmarks/gpu_kernels.py --variants)."""
    for shape, cfg in best.items():
        o, i = map(int, shape.split("x"))
        TUNED[(o, i)] = dict(cfg)


def config_for(out_f: int, rank: int = 0, in_f: int | None = None, reduce: bool = True) -> dict:
    """Launch configuration of a shape; reduce=False: the gather alone (`rsparse_partials`), which
    takes the rule where the TUNED entry is a one-launch (splits) one."""
    cfg = TUNED.get((out_f, in_f))
    if cfg is None or (cfg.get("splits") and (rank or not reduce)):  # the one-launch kernel is r = 0, eager only
        return _rule(out_f, in_f)
    return dict(cfg)


def _gather(x, wt, col_scale, tau, ypart, cfg, seg1, seg2):
    """`_fused_gather_gemv` over the whole layer: float32 partials (chunks, rows, out) into ypart."""
    B, IN = x.shape
    OUT = wt.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, x.device)
    torch.library.wrap_triton(_fused_gather_gemv)[(ntile, nchunk)](
        x, col_scale, tau, wt, scratch, ypart, B, IN, OUT, wt.stride(0), seg1, seg2,
        CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, num_warps=cfg["warps"],
        num_stages=cfg["stages"])
    return ypart


# Where a module's rank terms are computed: read by the modules when they call (trace) the ops and
# passed as their `rank_terms` argument (a configuration's "rank_terms" overrides it in `_launch`;
# the benchmarks switch it for A/B):
# "epilogue": low-rank inputs in a launch of their own (`_group_z`), U product in the epilogue
#   (3 launches, under torch.compile too);
# "gather": `_group_z`, then the gather adds the U product to its partials (2 launches; under
#   torch.compile inductor sums them in the consumer);
# "one-launch": the z programs first in the gather launch itself, tiles wait on a counter
#   (1 launch, under torch.compile too; the counter is the caller's `locks[0]`, left zeroed; a fill
#   launch per call only without locks or with `lowrank.KEPT_COUNTER = 0`).
# "one-launch" by default: on an H200 (session 9, one run side by side, Llama-3-8B shapes, alpha 0.9,
# 50%, batch 1, compiled) it ran 226.8 tok/s and "gather" 215.5 (dense 185.9); per call it is 1-3 us
# faster on every ranked shape. Its tiles spin on a counter the z programs (the launch's first
# program ids) raise: it relies on blocks being dispatched in program-id order, as on every NVIDIA GPU
# we ran and in Triton's interpreter. "epilogue" ran 204.7 (session 8). (Session 8's "gather" =
# "one-launch" tie was a benchmark defect: the mode was a global read inside the op, and the compile
# caches served the first mode's code to the second.)
RANK_TERMS = "one-launch"
RANK_MODES = ("epilogue", "gather", "one-launch")


def tile_locks(out_features: int, device) -> torch.Tensor:
    """Tile counters for the one-launch split kernel of a module of this width (one per output tile
    of the narrowest tiles, 16; `counters`): kept as a module buffer, so they live as long as any CUDA
    graph that captured a call."""
    return counters(triton.cdiv(out_features, 16), device)


def _launch(x, wt, at, u, col_scale, tau, bias, cfg, out=None, segments=None, glu=False, roffs=None, rank_terms="one-launch",
            locks=None):
    """segments: column boundaries (SEG1, SEG2) of a fused group's members, roffs: their rank-column
    boundaries (ROFF1, ROFF2) in at (in, RT) with u the members' U (out_p, r_p) packed one after the
    other; glu: the group is gate|up (SEG1 = OUT / 2) and the result is SiLU(gate) * up, (B, OUT / 2);
    locks: `tile_locks` for the one-launch split kernel and the one-launch rank terms' z counter (None:
    fresh ones, zero-filled per call)."""
    B, IN = x.shape
    OUT, R = wt.shape[1], at.shape[1]
    LDW = wt.stride(0)
    group = segments is not None
    seg1, seg2 = segments if group else (OUT, OUT)
    roff1, roff2 = roffs if roffs is not None else (R, R)
    y = torch.empty(B, OUT // 2 if glu else OUT, dtype=x.dtype, device=x.device) if out is None else out
    if R == 0 and cfg.get("splits"):
        return launch_splitk(x, wt, col_scale, tau, bias, cfg, y, seg1, seg2, glu, locks)
    ch, bn = cfg["chunk"], cfg["block_n"]
    nchunk, ntile = triton.cdiv(IN, ch), triton.cdiv(OUT, bn)
    mode = cfg.get("rank_terms") or rank_terms
    if mode not in RANK_MODES:
        raise ValueError(f"rank_terms must be one of {RANK_MODES}, got {mode!r}")
    ranked = R > 0 and mode != "epilogue"
    rb = _rank_block(R)
    meta = dict(CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, num_warps=cfg["warps"], num_stages=cfg["stages"])
    ypart = torch.empty(nchunk * B * OUT, dtype=torch.float32, device=x.device)
    zpart, nzchunk = ypart, nchunk  # the epilogue's z pointer, unread unless the epilogue adds the rank terms
    if ranked:  # rank terms included in the partials
        _ranked_gather(x, wt, at, u, col_scale, tau, cfg, seg1, seg2, roff1, roff2, mode, ypart=ypart, sync=locks)
    elif group or cfg.get("fused"):
        if R > 0:
            zpart, nzchunk = _group_z_launch(x, at, col_scale, tau, 1 + (seg1 < OUT) + (seg2 < OUT), roff1, roff2)
        _gather(x, wt, col_scale, tau, ypart, cfg, seg1, seg2)
    else:
        zpart = torch.empty(max(nchunk * B * R, 1), dtype=torch.float32, device=x.device)
        idx = torch.empty(nchunk * ch, dtype=torch.int32, device=x.device)
        cnt = torch.empty(nchunk, dtype=torch.int32, device=x.device)
        torch.library.wrap_triton(_select)[(nchunk,)](x, col_scale, tau, at, idx, cnt, zpart, B, IN, R, at.stride(0),
                                                      CHUNK=ch, BB=BB, RB=rb, HAS_R=R > 0)
        torch.library.wrap_triton(_gather_gemv)[(ntile, nchunk)](x, col_scale, tau, wt, idx, cnt, ypart, B, IN, OUT, LDW, **meta)
    b = bias if bias is not None else y
    tail = dict(BB=BB, BLOCK_N=bn, RB=rb, HAS_R=R > 0 and not ranked, HAS_BIAS=bias is not None,
                NCP=triton.next_power_of_2(nchunk), NZP=triton.next_power_of_2(nzchunk))
    if glu:
        torch.library.wrap_triton(_glu_epilogue)[(triton.cdiv(OUT // 2, bn),)](
            ypart, zpart, u, b, y, B, OUT, OUT // 2, R, roff1, nchunk, nzchunk, **tail)
        return y
    torch.library.wrap_triton(_epilogue)[(ntile,)](
        ypart, zpart, u, b, y, B, OUT, R, nchunk, nzchunk, seg1, seg2, roff1, roff2, **tail)
    return y


@torch.library.triton_op("rsparse::rsparse_gemv", mutates_args={"locks"})
def rsparse_gemv(x: torch.Tensor, wt: torch.Tensor, at: torch.Tensor, u: torch.Tensor, col_scale: torch.Tensor,
                 tau: torch.Tensor, locks: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 rank_terms: str = "one-launch") -> torch.Tensor:
    """y = rsparse_linear_ref(x, wt.T, bias, tau, col_scale, u, at.T) for x of 1..8 rows; locks:
    `tile_locks(out)`; rank_terms: one of RANK_MODES (see `RANK_TERMS`)."""
    return _launch(x, wt, at, u, col_scale, tau, bias, config_for(wt.shape[1], at.shape[1], wt.shape[0]),
                   rank_terms=rank_terms, locks=locks)


def group_block_n(seg1: int, seg2: int, out_total: int, in_f: int, reduce: bool = True) -> int | None:
    """Output tile width of a fused group's launch: the shape's configured width, halved (down to 16)
    until every inner member boundary falls on a tile boundary; None if none does."""
    bn = config_for(out_total, 0, in_f, reduce)["block_n"]
    inner = [b for b in (seg1, seg2) if b < out_total]
    while bn > 16 and any(b % bn for b in inner):
        bn //= 2
    return None if any(b % bn for b in inner) else bn


def _group_cfg(seg1: int, seg2: int, wt: torch.Tensor, rank: int, reduce: bool = True) -> dict:
    reduce = reduce and not rank  # rank terms need the partials + epilogue path (the one-launch kernel is r = 0 only)
    bn = group_block_n(seg1, seg2, wt.shape[1], wt.shape[0], reduce)
    if bn is None:
        raise ValueError(f"group members at columns {seg1}, {seg2} do not start on output tiles")
    return dict(config_for(wt.shape[1], 0, wt.shape[0], reduce), block_n=bn)


@torch.library.triton_op("rsparse::rsparse_group_gemv", mutates_args={"locks"})
def rsparse_group_gemv(x: torch.Tensor, wt: torch.Tensor, at: torch.Tensor, u: torch.Tensor, col_scale: torch.Tensor,
                       tau: torch.Tensor, locks: torch.Tensor, seg1: int, seg2: int, roff1: int, roff2: int,
                       bias: Optional[torch.Tensor] = None, rank_terms: str = "one-launch") -> torch.Tensor:
    """Up to 3 projections of the same x in one call: wt = [Wt_0 | Wt_1 | Wt_2] (in, out), at =
    [At_0 | At_1 | At_2] (in, RT), u = the members' U (out_p, r_p) flattened one after the other,
    col_scale (P, in), tau (P,), locks `tile_locks(out)`; member column boundaries seg1 <= seg2 (see
    `group_block_n`), rank boundaries roff1 <= roff2 in at."""
    return _launch(x, wt, at, u, col_scale, tau, bias, _group_cfg(seg1, seg2, wt, at.shape[1]),
                   segments=(seg1, seg2), roffs=(roff1, roff2), rank_terms=rank_terms, locks=locks)


@torch.library.triton_op("rsparse::rsparse_glu_gemv", mutates_args={"locks"})
def rsparse_glu_gemv(x: torch.Tensor, wt: torch.Tensor, at: torch.Tensor, u: torch.Tensor, col_scale: torch.Tensor,
                     tau: torch.Tensor, locks: torch.Tensor, roff1: int, bias: Optional[torch.Tensor] = None,
                     rank_terms: str = "one-launch") -> torch.Tensor:
    """SiLU(gate(x)) * up(x) for a gate|up group of two members of equal width: wt = [Wt_gate | Wt_up]
    (in, 2 I), at = [At_gate | At_up] (in, RT; gate's rank columns [0, roff1)), u packed as in
    `rsparse_group_gemv`, col_scale (2, in), tau (2,); returns (rows, I)."""
    IN, OUT = wt.shape
    if OUT % 2:
        raise ValueError(f"a gate|up group has two members of equal width, got {OUT} columns in all")
    half = OUT // 2
    return _launch(x, wt, at, u, col_scale, tau, bias, _group_cfg(half, OUT, wt, at.shape[1]),
                   segments=(half, OUT), glu=True, roffs=(roff1, at.shape[1]), rank_terms=rank_terms, locks=locks)


@torch.library.triton_op("rsparse::rsparse_partials", mutates_args={"locks"})
def rsparse_partials(x: torch.Tensor, wt: torch.Tensor, at: torch.Tensor, u: torch.Tensor, col_scale: torch.Tensor,
                     tau: torch.Tensor, locks: torch.Tensor, seg1: int, seg2: int, roff1: int, roff2: int,
                     rank_terms: str = "one-launch") -> torch.Tensor:
    """The gather alone (one launch; with rank terms in the "gather" mode `_group_z` before it): float32
    partials (chunks, rows, out) whose sum over the chunks is the sparse product with its rank terms
    (before bias and cast) of a module (seg1 = seg2 = out, roff1 = roff2 = r; col_scale (in,), tau ())
    or of a group (as in `rsparse_group_gemv`). Under torch.compile the sum, bias and cast are left to
    `sum_partials`, which inductor fuses into the consumer's kernel (RoPE and the cache write, the
    residual add) instead of launching our epilogue. locks: `tile_locks(out)`, the one-launch rank
    terms' counter (left zeroed)."""
    B, IN = x.shape
    cfg = _group_cfg(seg1, seg2, wt, 0, reduce=False)
    if at.shape[1]:  # the rank terms in the gather (the partials path runs them only there)
        return _ranked_gather(x, wt, at, u, col_scale, tau, cfg, seg1, seg2, roff1, roff2, rank_terms, sync=locks)
    ypart = torch.empty(triton.cdiv(IN, cfg["chunk"]), B, wt.shape[1], dtype=torch.float32, device=x.device)
    return _gather(x, wt, col_scale, tau, ypart, cfg, seg1, seg2)


def sum_partials(parts: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """y = sum of the chunk partials (in chunk order, as `_epilogue`) + bias, in dtype; written as
    elementwise adds so that inductor inlines it into the consumer rather than emitting a reduction."""
    y = parts[0]
    for i in range(1, parts.shape[0]):
        y = y + parts[i]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
