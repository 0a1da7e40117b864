"""Rank terms of the Triton decode kernels: U_r (A_r x_dropped), with At = A^T (in, r) so a dropped
channel reads r contiguous values (r a multiple of 16 in the modules: 128-bit loads, no spills).

z = x_dropped @ At is computed in partials over chunks of input channels (`_member_z`: a member's
rank columns of a group's At, thresholded with its own tau and scales): by `_group_z`, a launch of its
own, or (the default, "one-launch") by the first programs of `_ranked_gather_gemv`. The U product
z @ U^T (`_lowrank`, U (out, r) packed per member) is added by the gather tiles themselves
(`_ranked_gather_gemv`, each tile a share of the rank blocks; the default) or by the epilogue kernels
(`triton_gemv`). Which path a call takes: `triton_gemv.RANK_TERMS`. (Tried and removed in session 9,
"own-z": independent programs of the gather launch, each computing its own share of z and its U
product into extra partial rows; on the H200 a call took 2-4x as long as "gather", the programs'
serial At loops being the tail: docs/perf-gpu.md.)
"""
import torch
import triton
import triton.language as tl

from .counters import check_counters
from .tl_common import BB, _keep, _store_partial, _sum_partials, _tile_acc, gather_grid


@triton.jit
def _z_dot(x, keep, valid, at_ptr, offs, rr, rb, LDA):
    """x_dropped @ At[offs, rr] (float32, rows x rank columns rr < rb): each row's dropped entries of
    the channels `offs`; At rows are read only where some row dropped the channel."""
    drop_any = tl.max((valid & ~keep).to(tl.int32), axis=0) > 0
    at = tl.load(at_ptr + offs[:, None] * LDA + rr[None, :], mask=drop_any[:, None] & (rr[None, :] < rb), other=0.0)
    return tl.dot(tl.where(keep, 0.0, x).to(at.dtype), at, input_precision="ieee")


@triton.jit
def _z_chunk(x, keep, valid, at_ptr, offs, zbase, rows, B, LDA, RT, ra, rb, RB: tl.constexpr):
    """zbase[row, r] = sum over the chunk's channels that row dropped of x * At[channel, r], for r in
    [ra, rb) (a member's columns of At and of the z partials, both of row stride LDA / RT)."""
    for r0 in range(ra, rb, RB):
        rr = r0 + tl.arange(0, RB)
        z = _z_dot(x, keep, valid, at_ptr, offs, rr, rb, LDA)
        tl.store(zbase + rows[:, None] * RT + rr[None, :], z, mask=(rows[:, None] < B) & (rr[None, :] < rb))


@triton.jit
def _rank_range(p, ROFF1, ROFF2, RT):
    """Member p's rank columns [ra, rb) of the group's At (in, RT) and of the z partials."""
    ra = tl.where(p == 0, 0, tl.where(p == 1, ROFF1, ROFF2))
    rb = tl.where(p == 0, ROFF1, tl.where(p == 1, ROFF2, RT))
    return ra, rb


@triton.jit
def _member(n0, SEG1, SEG2, ROFF1, ROFF2, RT):
    """Member p of a group (up to 3 side by side) that owns output column n0: (p, its first column,
    its rank columns [ra, rb) of At / z, the offset of its U (out_p, r_p) in the packed U)."""
    p = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
    seg_lo = tl.where(p == 0, 0, tl.where(p == 1, SEG1, SEG2))
    ra, rb = _rank_range(p, ROFF1, ROFF2, RT)
    uoff = tl.where(p == 0, 0, tl.where(p == 1, SEG1 * ROFF1, SEG1 * ROFF1 + (SEG2 - SEG1) * (ROFF2 - ROFF1)))
    return p, seg_lo, ra, rb, uoff


@triton.jit
def _member_z(x_ptr, c_ptr, tau_ptr, at_ptr, zpart_ptr, chunk, p, B, IN, LDA, RT, ROFF1, ROFF2,
              CHUNK: tl.constexpr, BB: tl.constexpr, RB: tl.constexpr):
    """Member p's low-rank input partial for one chunk of channels, thresholded with its own tau /
    scales: zpart[chunk, :, ra:rb] = x_dropped @ At[chunk, ra:rb] (its rank columns of the group's At)."""
    ra, rb = _rank_range(p, ROFF1, ROFF2, RT)
    if rb > ra:
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        rows = tl.arange(0, BB)
        valid = (rows[:, None] < B) & (offs[None, :] < IN)
        x = tl.load(x_ptr + rows[:, None] * IN + offs[None, :], mask=valid, other=0.0)
        c = tl.load(c_ptr + p * IN + offs, mask=offs < IN, other=0.0)
        keep = _keep(x, c, tl.load(tau_ptr + p), valid)
        _z_chunk(x, keep, valid, at_ptr, offs, zpart_ptr + chunk * B * RT, rows, B, LDA, RT, ra, rb, RB)


@triton.jit
def _group_z(x_ptr, c_ptr, tau_ptr, at_ptr, zpart_ptr, B, IN, LDA, RT, ROFF1, ROFF2,
             CHUNK: tl.constexpr, BB: tl.constexpr, RB: tl.constexpr):
    """Low-rank inputs of a group's members in a launch of their own: grid (chunks, members)."""
    _member_z(x_ptr, c_ptr, tau_ptr, at_ptr, zpart_ptr, tl.program_id(0), tl.program_id(1), B, IN, LDA, RT, ROFF1, ROFF2,
              CHUNK, BB, RB)


@triton.jit
def _lowrank(acc, zpart_ptr, u_ptr, rows, n, nmask, B, RT, NZCHUNK, seg_lo, ra, rb, uoff, q0, qstep,
             BB: tl.constexpr, RB: tl.constexpr, NZP: tl.constexpr):
    """acc + z[:, ra:rb] @ U_p^T for a member's output columns n (the rank blocks of RB columns from
    ra + q0 in steps of qstep: all of them for q0 = 0, qstep = RB), z summed over the NZCHUNK partials
    (NZCHUNK, B, RT) in (NZP, RB) tiles (`_sum_partials`); U_p (out_p, r_p = rb - ra) is packed at
    u_ptr + uoff, its first row for column seg_lo. z is loaded .cg (from L2): in
    `_ranked_gather_gemv` other programs of the same launch wrote it."""
    for r0 in range(ra + q0, rb, qstep):
        rr = r0 + tl.arange(0, RB)
        z = tl.zeros((BB, RB), dtype=tl.float32)
        for c0 in range(0, NZCHUNK, NZP):  # NZP caps the tile, whose reduction goes through shared memory
            z += _sum_partials(zpart_ptr, rows, rr, rr < rb, B, RT, c0, NZCHUNK, BB, RB, NZP, ".cg")
        u = tl.load(u_ptr + uoff + (n[None, :] - seg_lo) * (rb - ra) + (rr[:, None] - ra),
                    mask=(rr[:, None] < rb) & nmask[None, :], other=0.0)
        acc += tl.dot(z.to(u.dtype), u, input_precision="ieee")
    return acc


@triton.jit
def _ranked_tile(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, zpart_ptr, u_ptr, sync_ptr, t, B, IN, OUT, LDW,
                 SEG1, SEG2, RT, ROFF1, ROFF2, NTILE, NZCHUNK, NZ, NW, CHUNK: tl.constexpr, BB: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WAIT: tl.constexpr, RB: tl.constexpr, NZP: tl.constexpr,
                 KEPT: tl.constexpr):
    """Gather tile t (tile-major per chunk) of `_ranked_gather_gemv` plus its share of the U product."""
    pid_n, chunk = t % NTILE, t // NTILE
    acc = _tile_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, pid_n, chunk, B, IN, OUT, LDW, SEG1, SEG2, CHUNK, BB,
                    BLOCK_K, BLOCK_N)
    # rank block q of the tile's member is added by the tile of chunk NCHUNK - 1 - q % NCHUNK: the U
    # work spread over the chunks (session 7 gave it all to the last chunk's tiles and lost end to
    # end at ranks 96-144; their longer tail is the hypothesis), falling to the last chunks,
    # dispatched last, when there are fewer blocks than chunks
    nchunk = tl.cdiv(IN, CHUNK)
    p, seg_lo, ra, rb, uoff = _member(pid_n * BLOCK_N, SEG1, SEG2, ROFF1, ROFF2, RT)
    q0 = (nchunk - 1 - chunk) * RB
    if ra + q0 < rb:
        ticket = 0
        if WAIT:  # until every z program of the launch has raised the counter
            while tl.atomic_add(sync_ptr, 0, sem="acquire") < NZ:
                pass
            if KEPT:  # arrive (the counter only grows past NZ: no waiting tile is misled); read after the U product
                ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _lowrank(acc, zpart_ptr, u_ptr, tl.arange(0, BB), n, n < OUT, B, RT, NZCHUNK, seg_lo, ra, rb, uoff, q0,
                       nchunk * RB, BB, RB, NZP)
        if KEPT:
            if ticket == NZ + NW - 1:  # the last of the NW waiting tiles: nobody reads the counter any more
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)


@triton.jit
def _ranked_gather_gemv(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, at_ptr, zpart_ptr, u_ptr, sync_ptr,
                        B, IN, OUT, LDW, SEG1, SEG2, LDA, RT, ROFF1, ROFF2, NTILE, NZCHUNK, NZ, NW,
                        CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        Z_HERE: tl.constexpr, ZCHUNK: tl.constexpr, RB: tl.constexpr, NZP: tl.constexpr, KEPT: tl.constexpr):
    """The gather with the rank terms' U product: 1-d grid of the gather tiles (tile-major per chunk); a
    tile, once its partial is gathered, adds its share of its member's z @ U^T (some rank blocks), so
    the chunks' partials sum to W_S x_S + U (A x_dropped). The NZCHUNK low-rank input partials z come
    from `_group_z` before the launch, or (Z_HERE) from the launch's own first NZ programs
    (`_member_z`, NZCHUNK chunks x members), which each raise the counter sync_ptr (zero at the start);
    tiles then wait until it reaches NZ. No deadlock: blocks start in program-id order, so every z
    program has started before a tile waits, and a waiting tile has done its gather first. (A counter
    kept by the module and zeroed by the launch itself, to save the per-call fill, was built in session
    9 and measured 0.6-2.6 us slower per call on the H200 in session 10: removed, docs/perf-gpu.md;
    session 27's KEPT below measured 3.2% faster end to end.)
    KEPT: the counter is kept by its owner, zero between calls: each of the NW tiles that wait draws a
    ticket once past the wait (read only after its U product, so the atomic's latency hides behind
    it), and the one drawing NZ + NW - 1 stores zero (no fill launch per call; session 27)."""
    pid = tl.program_id(0)
    # Z_HERE is a constexpr so that without z programs no z branch is compiled (sm_90: 72 registers,
    # 19 KB shared, as the gather alone; 90 registers with the branch compiled in and never taken)
    if Z_HERE:
        if pid < NZ:
            _member_z(x_ptr, c_ptr, tau_ptr, at_ptr, zpart_ptr, pid % NZCHUNK, pid // NZCHUNK, B, IN, LDA, RT, ROFF1, ROFF2,
                      ZCHUNK, BB, RB)
            tl.debug_barrier()  # the whole partial is written before the count is raised (release)
            tl.atomic_add(sync_ptr, 1, sem="release")
        else:
            _ranked_tile(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, zpart_ptr, u_ptr, sync_ptr, pid - NZ, B, IN, OUT,
                         LDW, SEG1, SEG2, RT, ROFF1, ROFF2, NTILE, NZCHUNK, NZ, NW, CHUNK, BB, BLOCK_K, BLOCK_N, True, RB, NZP,
                         KEPT)
    else:
        _ranked_tile(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, zpart_ptr, u_ptr, sync_ptr, pid, B, IN, OUT,
                     LDW, SEG1, SEG2, RT, ROFF1, ROFF2, NTILE, NZCHUNK, NZ, NW, CHUNK, BB, BLOCK_K, BLOCK_N, False, RB, NZP,
                     False)


ZCHUNK = 256  # channels per low-rank input program of `_group_z` (a ZCHUNK x RB tile of At)
# "one-launch" z programs and the z sums in smaller tiles: a kernel's shared memory is that of its
# largest branch, and the gather tiles' occupancy sets the kernel's speed (sm_90: 22-31 KB per program
# at 128 x 32 tiles, 111 KB at 256 x 64; the gather alone 19 KB)
RANKED_TILES = dict(ZCHUNK=128, RB=32, NZP=32)
# (Session 22 measured the gather tiles' U product in 64-column rank blocks and with U's loads one
# block ahead of the dots, the first before the wait for z: gate|up 44.9 -> 53.3-56.0 us, the other
# calls within +-1 us; removed, code at 14e5bff, `gpu_rank_knobs_s22.json`.)
# Wide calls (out x in >= WIDE_CALL: the MLP's) take ZCHUNK_WIDE channels per z program, so fewer z
# programs share the SMs with the gather tiles (gate|up: 16 instead of 64 beside 224 tiles). Measured
# (session 21, alpha 0.9, 50%, `gpu_rank_zchunk_s21.json`): 512 takes gate|up 50.6 -> 44.8 us and down
# 34.9 -> 32.1; q|k|v, short, gets slower (18.4 -> 23.2: a z program's serial rank blocks then outlast
# its gather), so it keeps 128. Why the wide calls gain is not verified (docs/perf-gpu.md, session 21).
ZCHUNK_WIDE, WIDE_CALL = 512, 1 << 25
# One-launch calls given their owner's counters (`sync`) count z programs on them and leave them zeroed
# (KEPT above); 0: a fresh zeroed counter per call, a fill launch each (before session 27).
KEPT_COUNTER = 1


def knobs() -> dict:
    """The rank path's tunables that benchmarks A/B (`rsparse bench --rank-ab`): ZCHUNK_WIDE, KEPT_COUNTER."""
    return dict(ZCHUNK_WIDE=ZCHUNK_WIDE, KEPT_COUNTER=KEPT_COUNTER)


_KNOB_RULES = {"ZCHUNK_WIDE": (lambda v: v == 0 or (v >= 16 and v & (v - 1) == 0), "0 or a power of two >= 16"),
               "KEPT_COUNTER": (lambda v: v in (0, 1), "0 or 1")}


def check_knobs(values: dict) -> None:
    """Raise ValueError naming the first of `values` that is no knob or breaks its knob's rule."""
    for key, value in values.items():
        if key not in _KNOB_RULES:
            raise ValueError(f"unknown rank-path knob {key!r}; choose from {sorted(_KNOB_RULES)}")
        if not isinstance(value, (int, bool)) or not _KNOB_RULES[key][0](int(value)):
            raise ValueError(f"{key} must be {_KNOB_RULES[key][1]}, got {value!r}")


def set_knobs(values: dict) -> dict:
    """Set some of `knobs()` (`check_knobs` first: nothing is set if one is bad); returns the previous
    values of all of them. Read at launch (or trace): a compiled step keeps those it was traced with."""
    global ZCHUNK_WIDE, KEPT_COUNTER
    check_knobs(values)
    previous = knobs()
    if "ZCHUNK_WIDE" in values:
        ZCHUNK_WIDE = int(values["ZCHUNK_WIDE"])
    if "KEPT_COUNTER" in values:
        KEPT_COUNTER = int(values["KEPT_COUNTER"])
    return previous


def z_chunk(IN: int, OUT: int) -> int:
    """Channels per z program of a one-launch ranked gather."""
    return ZCHUNK_WIDE if ZCHUNK_WIDE and OUT * IN >= WIDE_CALL else RANKED_TILES["ZCHUNK"]


def _rank_block(R: int) -> int:
    return 32 if R <= 32 else 64


def _group_z_launch(x, at, col_scale, tau, members, roff1, roff2):
    """`_group_z`: the members' low-rank input partials (chunks of ZCHUNK channels, rows, RT), one launch;
    returns them and their chunk count."""
    B, IN = x.shape
    R = at.shape[1]
    nzchunk = triton.cdiv(IN, ZCHUNK)
    zpart = torch.empty(nzchunk * B * R, dtype=torch.float32, device=x.device)
    torch.library.wrap_triton(_group_z)[(nzchunk, members)](x, col_scale, tau, at, zpart, B, IN, at.stride(0), R, roff1, roff2,
                                                            CHUNK=ZCHUNK, BB=BB, RB=_rank_block(R))
    return zpart, nzchunk


def waiting_tiles(OUT: int, R: int, seg1: int, seg2: int, roff1: int, roff2: int, nchunk: int, block_n: int) -> int:
    """Tiles of a one-launch ranked gather that add rank blocks, so wait for z: per member, its output
    tiles times the chunks whose share of the rank blocks is not empty (`_ranked_tile`: chunk c takes
    blocks from (nchunk - 1 - c) RB)."""
    widths, ranks = (seg1, seg2 - seg1, OUT - seg2), (roff1, roff2 - roff1, R - roff2)
    rb = RANKED_TILES["RB"]
    return sum(triton.cdiv(w, block_n) * min(nchunk, triton.cdiv(r, rb)) for w, r in zip(widths, ranks) if w > 0)


def _ranked_gather(x, wt, at, u, col_scale, tau, cfg, seg1, seg2, roff1, roff2, mode: str, ypart=None, sync=None):
    """The gather with every member's rank term over the whole layer: float32 partials (chunks, B, out)
    (ypart if given) whose sum includes the rank terms. mode: "gather" (`_group_z`, then
    `_ranked_gather_gemv`) or "one-launch" (its own first programs compute z). sync: the owner's
    counters (`triton_gemv.tile_locks`), the first counted on and left zeroed by a one-launch call
    (unless KEPT_COUNTER is 0); None: a fresh zeroed one per call."""
    if mode not in ("gather", "one-launch"):
        raise ValueError(f"rank terms in the gather launch: rank_terms 'gather' or 'one-launch', got {mode!r}")
    B, IN = x.shape
    OUT, R = wt.shape[1], at.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, x.device)
    if ypart is None:
        ypart = torch.empty(nchunk, B, OUT, dtype=torch.float32, device=x.device)
    assert ypart.numel() == nchunk * B * OUT, (ypart.shape, nchunk)
    members = 1 + (seg1 < OUT) + (seg2 < OUT)
    one_launch = mode == "one-launch"
    if one_launch:
        nzchunk = triton.cdiv(IN, z_chunk(IN, OUT))
        zpart = torch.empty(nzchunk * B * R, dtype=torch.float32, device=x.device)
        kept = sync is not None and bool(KEPT_COUNTER)
        if kept:
            check_counters(sync, 1, "tile counters", "1", x.device, "triton_gemv.tile_locks")
        else:
            sync = torch.zeros(1, dtype=torch.int32, device=x.device)  # z programs done: counted from 0 every call
        nz = nzchunk * members
    else:
        zpart, nzchunk = _group_z_launch(x, at, col_scale, tau, members, roff1, roff2)
        sync, nz, kept = scratch, 0, False  # no z programs, no counter (the pointer is unused)
    nw = waiting_tiles(OUT, R, seg1, seg2, roff1, roff2, nchunk, bn) if kept else 0  # read by KEPT kernels only
    torch.library.wrap_triton(_ranked_gather_gemv)[(nz + ntile * nchunk,)](
        x, col_scale, tau, wt, scratch, ypart, at, zpart, u, sync, B, IN, OUT, wt.stride(0), seg1, seg2, at.stride(0), R,
        roff1, roff2, ntile, nzchunk, nz, nw, CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, Z_HERE=one_launch,
        **dict(RANKED_TILES, ZCHUNK=z_chunk(IN, OUT)), KEPT=kept, num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart
