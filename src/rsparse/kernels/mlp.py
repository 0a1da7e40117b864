"""The sparse SiLU MLP's decode step as one launch: down(SiLU(gate x) * up x), r = 0 (`_mlp_chain`).

Two calls do this today: the gate|up gather (its partials summed and SiLU(gate) * up applied by
`_glu_epilogue`, or by inductor) and then down's gather. Here one 1-D grid holds both: programs
[0, G) are gate|up's tiles (output tile t % NT_GU over input chunk t // NT_GU of x, exactly as
`_fused_gather_gemv`), programs [G, G + D) down's. A gate|up program stores its float32 partial
(NCH_GU, B, 2 I) and takes a ticket of its column group k (gate tile k and up tile k, 2 NCH_GU
programs); the group's last program sums the group's partials (from L2), writes h = SiLU(gate) * up
for its BN_GU columns to hbuf (B, I) (rounded as `_silu_mul`, so h equals the two-call path's bit for
bit) and raises the counter of the down chunk those columns fall in (release). A down program of
input chunk c (I channels [c CH_D, (c + 1) CH_D)) spins until that counter counts every column group
of the chunk, then compacts its kept channels of h and gathers their Wd^T rows (`_tile_acc`) into
down's partials (NCH_D, B, OUT). The counters' last users zero them (ticket counters, `counters`), so
a module buffer serves every call. (Session 26's first version had every down program form its
chunk's 2048 values of h itself from the partials: 74-86 µs per layer against 59.4 for the two calls.)

What it saves per MLP (docs/perf-gpu.md, session 26): the epilogue's launch, and down's ramp
(compaction, first loads) overlaps gate|up's uneven tail instead of following it.
Layout constraints: I (half of gate|up's width) and CH_D are multiples of BN_GU, so a gate|up tile
feeds one down chunk. The spin relies on blocks being dispatched in program-id order (every gate|up
program placed before any down program waits), as `lowrank._ranked_gather_gemv` does; Triton's
interpreter runs programs in that order too.
"""
import torch
import triton
import triton.language as tl

from .counters import check_counters
from .tl_common import BB, _silu_mul, _store_partial, _sum_partials, _tile_acc


@triton.jit
def _mlp_chain(x_ptr, cg_ptr, taug_ptr, wg_ptr, sg_ptr, gpart_ptr, cd_ptr, taud_ptr, wd_ptr, sd_ptr, h_ptr, dpart_ptr,
               lock_ptr, B, IN, HALF, OUT, LDG, LDD, NT_GU, NCH_GU, NT_D, NCH_D,
               CH_GU: tl.constexpr, BN_GU: tl.constexpr, CH_D: tl.constexpr, BN_D: tl.constexpr,
               BB: tl.constexpr, BLOCK_K: tl.constexpr, NCP: tl.constexpr, SLEEP: tl.constexpr):
    pid = tl.program_id(0)
    # the two branches name their tiles apart: Triton types a name assigned in both as one, and the tiles' widths differ
    G = NT_GU * NCH_GU
    if pid < G:
        pid_n, chunk = pid % NT_GU, pid // NT_GU
        gacc = _tile_acc(x_ptr, cg_ptr, taug_ptr, wg_ptr, sg_ptr, pid_n, chunk, B, IN, 2 * HALF, LDG, HALF, 2 * HALF, CH_GU, BB,
                         BLOCK_K, BN_GU)
        _store_partial(gpart_ptr, gacc, chunk, pid_n, B, 2 * HALF, BB, BN_GU)
        n0 = pid_n * BN_GU
        k = (n0 - (n0 >= HALF).to(tl.int32) * HALF) // BN_GU  # the column group: gate tile k and up tile k
        tl.debug_barrier()  # the whole partial is written before the ticket is taken (release)
        if tl.atomic_add(lock_ptr + 2 * NCH_D + k, 1, sem="acq_rel") == 2 * NCH_GU - 1:  # the group's last program
            rows = tl.arange(0, BB)
            cols = k * BN_GU + tl.arange(0, BN_GU)
            cm = cols < HALF
            g = _sum_partials(gpart_ptr, rows, cols, cm, B, 2 * HALF, 0, NCH_GU, BB, BN_GU, NCP, ".cg")
            u = _sum_partials(gpart_ptr + HALF, rows, cols, cm, B, 2 * HALF, 0, NCH_GU, BB, BN_GU, NCP, ".cg")
            dt = h_ptr.dtype.element_ty
            tl.store(h_ptr + rows[:, None] * HALF + cols[None, :], _silu_mul(g, u, dt).to(dt), mask=(rows[:, None] < B) & cm[None, :])
            tl.store(lock_ptr + 2 * NCH_D + k, 0)
            tl.debug_barrier()  # h's columns are written before down's chunk hears of them (release)
            tl.atomic_add(lock_ptr + (k * BN_GU) // CH_D, 1, sem="release")
    else:
        d = pid - G
        pid_n, chunk = d % NT_D, d // NT_D
        need = tl.cdiv(tl.minimum(CH_D, HALF - chunk * CH_D), BN_GU)  # column groups in the chunk
        while tl.atomic_add(lock_ptr + chunk, 0, sem="acquire") < need:
            if SLEEP > 0:  # back off between polls (PTX nanosleep; GPU only: the interpreter runs no assembly)
                tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, $1;", "=r,r", [tl.full((1,), SLEEP, tl.int32)],
                                          dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()  # every warp reads h after the acquire
        dacc = _tile_acc(h_ptr, cd_ptr, taud_ptr, wd_ptr, sd_ptr, pid_n, chunk, B, HALF, OUT, LDD, OUT, OUT, CH_D, BB, BLOCK_K, BN_D)
        _store_partial(dpart_ptr, dacc, chunk, pid_n, B, OUT, BB, BN_D)
        if tl.atomic_add(lock_ptr + NCH_D + chunk, 1, sem="acq_rel") == NT_D - 1:  # the chunk's last down program
            tl.store(lock_ptr + chunk, 0)
            tl.store(lock_ptr + NCH_D + chunk, 0)


def chain_fits(half: int, cfg_gu: dict, cfg_d: dict) -> bool:
    """Whether a gate|up tile feeds exactly one down chunk (`_mlp_chain`'s layout constraint)."""
    return half % cfg_gu["block_n"] == 0 and cfg_d["chunk"] % cfg_gu["block_n"] == 0


def chain_locks_needed(half: int, cfg_gu: dict, cfg_d: dict) -> int:
    """Counters a call needs: two per down chunk, one per gate|up column group."""
    return 2 * triton.cdiv(half, cfg_d["chunk"]) + half // cfg_gu["block_n"]


def launch_chain(x, wt_gu, c_gu, tau_gu, wt_d, c_d, tau_d, locks, cfg_gu, cfg_d, warps=None, stages=None, sleep=0):
    """One `_mlp_chain` launch; returns down's float32 partials (NCH_D, B, OUT) (their sum over the
    chunks is down's output before cast). warps / stages: the launch's (one for both kinds of
    program; default gate|up's configuration); sleep: ns a waiting down program sleeps between polls (0: none; > 0 is for eager
    benchmarks: torch's kernel analysis takes the assembly for a write to every input, so a compiled step
    would copy them all on each call)."""
    B, IN = x.shape
    HALF, OUT = wt_gu.shape[1] // 2, wt_d.shape[1]
    if wt_d.shape[0] != HALF or wt_gu.shape[0] != IN:
        raise ValueError(f"the MLP chain needs gate|up (in, 2 I) and down (I, out), got {tuple(wt_gu.shape)} and {tuple(wt_d.shape)}")
    if not chain_fits(HALF, cfg_gu, cfg_d):
        raise ValueError(f"gate|up tiles of {cfg_gu['block_n']} columns do not each feed one down chunk of {cfg_d['chunk']} "
                         f"(I = {HALF})")
    ch_gu, bn_gu, ch_d, bn_d = cfg_gu["chunk"], cfg_gu["block_n"], cfg_d["chunk"], cfg_d["block_n"]
    nch_gu, nt_gu, nch_d, nt_d = triton.cdiv(IN, ch_gu), triton.cdiv(2 * HALF, bn_gu), triton.cdiv(HALF, ch_d), triton.cdiv(OUT, bn_d)
    need = chain_locks_needed(HALF, cfg_gu, cfg_d)
    check_counters(locks, need, "chain counters", str(need), x.device, "TritonGroup.chain_locks")
    sg = torch.empty(nt_gu * nch_gu * ch_gu, dtype=torch.int32, device=x.device)
    sd = torch.empty(nt_d * nch_d * ch_d, dtype=torch.int32, device=x.device)
    gpart = torch.empty(nch_gu * B * 2 * HALF, dtype=torch.float32, device=x.device)
    dpart = torch.empty(nch_d, B, OUT, dtype=torch.float32, device=x.device)
    h = torch.empty(B, HALF, dtype=x.dtype, device=x.device)
    torch.library.wrap_triton(_mlp_chain)[(nt_gu * nch_gu + nt_d * nch_d,)](
        x, c_gu, tau_gu, wt_gu, sg, gpart, c_d, tau_d, wt_d, sd, h, dpart, locks, B, IN, HALF, OUT, wt_gu.stride(0),
        wt_d.stride(0), nt_gu, nch_gu, nt_d, nch_d, CH_GU=ch_gu, BN_GU=bn_gu, CH_D=ch_d, BN_D=bn_d, BB=BB,
        BLOCK_K=cfg_gu["block_k"], NCP=triton.next_power_of_2(nch_gu), SLEEP=sleep, num_warps=warps or cfg_gu["warps"],
        num_stages=stages or cfg_gu["stages"])
    return dpart


def chain_configs(wt_gu: torch.Tensor, wt_d: torch.Tensor) -> tuple:
    """The gate|up and down configurations the chain launches with: each call's own gather configuration
    (`triton_gemv`, the partials path), so the chain reads what the two calls would."""
    from .triton_gemv import _group_cfg, config_for

    half = wt_gu.shape[1] // 2
    return _group_cfg(half, 2 * half, wt_gu, 0, reduce=False), config_for(wt_d.shape[1], 0, wt_d.shape[0], reduce=False)


@torch.library.triton_op("rsparse::rsparse_mlp", mutates_args={"locks"})
def rsparse_mlp(x: torch.Tensor, wt_gu: torch.Tensor, c_gu: torch.Tensor, tau_gu: torch.Tensor, wt_d: torch.Tensor,
                c_d: torch.Tensor, tau_d: torch.Tensor, locks: torch.Tensor, reduce: bool, warps: int = 0,
                stages: int = 0, sleep: int = 0) -> torch.Tensor:
    """down(SiLU(gate(x)) * up(x)) for r = 0 modules without bias: wt_gu = [Wt_gate | Wt_up] (in, 2 I),
    c_gu (2, in), tau_gu (2,), wt_d = Wt_down (I, out), c_d (I,), tau_d (); locks: `chain_locks_needed`
    zeroed counters (left zeroed). reduce: y (rows, out) in x's dtype (one more launch, `_epilogue`);
    else down's float32 partials (chunks, rows, out) for the consumer to sum (`triton_gemv.sum_partials`).
    warps / stages: the launch's (0: gate|up's configuration); sleep: `launch_chain`'s."""
    from .triton_gemv import _epilogue

    cfg_gu, cfg_d = chain_configs(wt_gu, wt_d)
    parts = launch_chain(x, wt_gu, c_gu, tau_gu, wt_d, c_d, tau_d, locks, cfg_gu, cfg_d, warps, stages, sleep)
    if not reduce:
        return parts
    nch, B, OUT = parts.shape
    y = torch.empty(B, OUT, dtype=x.dtype, device=x.device)
    bn = cfg_d["block_n"]
    torch.library.wrap_triton(_epilogue)[(triton.cdiv(OUT, bn),)](
        parts, parts, parts, y, y, B, OUT, 0, nch, 1, OUT, OUT, 0, 0, BB=BB, BLOCK_N=bn, RB=16, HAS_R=False, HAS_BIAS=False,
        NCP=triton.next_power_of_2(nch), NZP=1)
    return y
