"""TritonRSparseLinear: RSparseLinear with the decode step on the Triton kernels.

Layout (`TransposedRSparseLinear`): Wt = W^T (in, out) so a kept input channel is one contiguous
row, At = A^T (in, r) so a dropped channel reads r contiguous values, and here U (out, r). Only Wt
is stored, so prefill (`dense()`, used by `dense_view`) runs a dense cuBLAS matmul on the same
storage. Inputs of 1..8 rows (decode) go to `rsparse::rsparse_gemv`, up to the module's `max_rows`
(above it, where the rows' union of kept channels nears all of them, the dense product: faster and
exact); more than 8 rows (all-tokens evaluation) run the eager oracle on the same buffers.
`TritonGroup` runs q|k|v or gate|up as one call (`rsparse::rsparse_group_gemv`) for the decoder, and
gate|up's SiLU(gate) * up with the activation in the epilogue (`rsparse::rsparse_glu_gemv`). Under
torch.compile, calls without a rank term (and with one, where `triton_gemv.RANK_TERMS` lets the
gather add it) run the gather alone (`rsparse::rsparse_partials`), and inductor fuses the partials'
sum into the next kernel; with `use_gather("cuda")` the r = 0 ones run the CUDA C++ gather instead
(`rsparse::cuda_partials`, `cuda_gather.py`), the same partials for the consumer to sum.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..families import group_members
from ..linear import MAX_DECODE_ROWS, RSparseLinear, TransposedRSparseLinear
from . import cuda_gather, triton_gemv  # registers torch.ops.rsparse.cuda_partials and .rsparse_gemv


# Under torch.compile, r = 0 calls launch the gather alone and leave the sum of its partials (+ bias,
# cast) to inductor, which fuses it into the consumer's kernel: one launch per call instead of two
# ("all", measured +1.0-1.3% end to end, session 6). "non-splitk" keeps the one-launch kernel on the
# shapes where TUNED chose it (no partials for the consumer to read: inductor's small kernels read
# them with few programs); "none" keeps our epilogue kernel everywhere. Eager calls (and CUDA graphs
# of eager steps) always keep the kernels: one launch instead of a sum and a cast.
REDUCE_IN_CONSUMER = "all"

# The gather of r = 0 calls whose partials the consumer sums (compiled steps): "triton" (our Triton
# gather, `rsparse_partials`) or "cuda" (`cuda_gather.cuda_partials`, built with nvcc; alone 6-28% faster
# than the Triton gather on an H200 at 50% and batch 1, but a compiled batch-1 step no faster: 1.00x, and
# 1.02x with `cuda_gather.CHUNKS` 4, session 35), on the calls it takes (`cuda_gather.fits`: batch 1 only;
# the others keep the Triton gather). Set it with `use_gather`, which builds the CUDA kernel first.
GATHER = "triton"


def use_gather(name: str) -> None:
    """Switch GATHER (read when a step is traced). "cuda" builds the CUDA gather now, outside any trace;
    raises ValueError naming the reason where it cannot (no GPU, no nvcc, a failed build)."""
    global GATHER
    if name not in ("triton", "cuda"):
        raise ValueError(f"gather must be triton or cuda, got {name!r}")
    if name == "cuda":
        cuda_gather.require()
    GATHER = name


def _partials(rows, wt, at, u, col_scale, tau, locks, seg1, seg2, roff1, roff2):
    """The gather alone, its float32 partials for the consumer to sum: the CUDA kernel where GATHER asks
    for it and it takes the call (r = 0, members on its tiles), else the Triton gather."""
    if GATHER == "cuda" and cuda_gather.fits(wt, at.shape[1], seg1, seg2, rows.shape[0]):
        return torch.ops.rsparse.cuda_partials(rows, wt, col_scale, tau, seg1, seg2, cuda_gather.CHUNKS)
    return torch.ops.rsparse.rsparse_partials(rows, wt, at, u, col_scale, tau, locks, seg1, seg2, roff1, roff2,
                                               triton_gemv.RANK_TERMS)


def consumer_reduces(at: torch.Tensor, wt: torch.Tensor) -> bool:
    """Rank terms too, where the gather launch adds them (`triton_gemv.RANK_TERMS` not "epilogue")."""
    if REDUCE_IN_CONSUMER == "none" or not torch.compiler.is_compiling():
        return False
    if at.shape[1] and triton_gemv.RANK_TERMS == "epilogue":
        return False
    return REDUCE_IN_CONSUMER == "all" or not triton_gemv.config_for(wt.shape[1], 0, wt.shape[0]).get("splits")


# Rank columns are stored in multiples of RANK_ALIGN (zero columns added: their z is 0 and their U
# column 0, so the product is unchanged): every At and U row then starts 16-element aligned and
# Triton emits 128-bit loads. With an odd rank (79, 51, ...) it emitted scalar 2-byte loads and the
# low-rank kernels spilled registers (sm_90 SASS, docs/perf-gpu.md session 6). The rank property
# and the benchmark's byte counts report the stored (padded) rank: those bytes are read.
RANK_ALIGN = 16

# An A/B switch for every module at once (`rsparse bench --device cuda --masked-dense`): decode calls
# of more than KERNEL_MAX_ROWS rows run the masked dense product (the oracle `rsparse_linear_ref`:
# cuBLAS on the same storage with each row's dropped channels zeroed, plus the low-rank term), which
# keeps the sparse results. Which batch sizes a module runs on the kernels by default is its own
# `max_rows` (`kernel_rows` below).
KERNEL_MAX_ROWS = MAX_DECODE_ROWS


# A decode call gathers the union of its rows' kept channels: 1 - (1 - keep)^B of them for B
# independent rows. Past some union the dense product on the same storage (cuBLAS; exact) is faster,
# so a module with a calibrated `keep` runs more rows than `kernel_rows(keep, rank)` dense. Measured
# on an H200, compiled Llama-3-8B-shaped steps, r = 0, every projection on the kernels (docs/perf-gpu.md
# session 14, one run per two batch sizes, measured unions): B4 at a union of 0.75 1.18x dense, 0.86
# 1.08x, 0.93 1.04x, 0.97 1.00x; B8 at 0.93 0.98x, 0.98-1.00 0.93-0.95x (sessions 5 and 10, slower
# kernels: B4 at 0.93 0.97x, hence 0.88 before). The expected union below runs ~0.01 above the measured
# one (rows of real text are correlated), so 0.94 puts B4 at 50% on the kernels and B8 at 70% on
# cuBLAS, as measured. Session 19 (against the faster dense, compiled): B4 at unions 0.75 / 0.86 /
# 0.93 / 0.97 1.19 / 1.09 / 1.04 / 1.01x, B8 at 0.93-1.00 0.93-0.98x: the rule still holds. With rank
# terms (alpha 0.9) every batch above 1 was slower than dense (B2 at 50%, union 0.70: 0.90x; B4 at
# 70%, union 0.71: 0.88x; B8 at 50%: 0.65x): each row also reads the rank factors for the channels it
# drops, which at B > 1 are nearly all.
UNION_MAX = 0.94


def kernel_rows(keep: float | None, rank: int) -> int:
    """The most decode rows a module runs on the gather kernels (more run the dense product); keep
    None (no calibration known, e.g. a module built by hand): every decode batch on the kernels."""
    if keep is None:
        return MAX_DECODE_ROWS
    if rank:
        return 1
    b = 1
    while b < MAX_DECODE_ROWS and 1 - (1 - keep) ** (b + 1) <= UNION_MAX:
        b += 1
    return b


def on_kernels(rows: torch.Tensor, max_rows: int = MAX_DECODE_ROWS) -> bool:
    """Whether a call of these rows runs the decode kernels (read at call / trace time, so that the
    benchmark can switch KERNEL_MAX_ROWS between captures)."""
    return rows.shape[0] <= min(max_rows, MAX_DECODE_ROWS, KERNEL_MAX_ROWS)


class TritonRSparseLinear(TransposedRSparseLinear):
    def __init__(self, m: RSparseLinear):
        super().__init__(m)
        pad = -m.rank % RANK_ALIGN
        self.at = torch.nn.functional.pad(self.at, (0, pad)).contiguous()
        self.register_buffer("U", torch.nn.functional.pad(m.U.detach(), (0, pad)).contiguous())
        # the one-launch split kernel's tile counters (and the ranked gather's z counter, the first), left
        # zeroed by every call: no fill per call
        self.register_buffer("tile_locks", triton_gemv.tile_locks(self.out_features, self.wt.device), persistent=False)
        self.max_rows = kernel_rows(self.keep, m.rank)

    def decode_rows(self, rows):
        if rows.shape[0] > self.max_rows:  # the rows keep nearly every channel together: dense pays
            return torch.nn.functional.linear(rows, self.weight, self.bias)
        if not on_kernels(rows):
            return self.oracle(rows)  # masked dense: cuBLAS on the same storage
        if consumer_reduces(self.at, self.wt):
            n = self.out_features
            r = self.at.shape[1]
            parts = _partials(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.tile_locks, n, n, r, r)
            return triton_gemv.sum_partials(parts, self.bias, rows.dtype)
        return torch.ops.rsparse.rsparse_gemv(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.tile_locks,
                                              self.bias, triton_gemv.RANK_TERMS)


class TritonGroup(nn.Module):
    """Projections that read the same input (q|k|v, gate|up) as one call. The members' Wt become
    column views of the group's (in, sum out) storage, their At column views of the group's
    (in, sum r) and their U views of the group's U (each member's (out, r) one after the other), and
    their tau / col_scale views of the group's (P,) / (P, in) buffers: nothing is stored twice, and
    updating a member's tau in place updates the group. Inputs of more rows than any member runs on
    the kernels (its `max_rows`, KERNEL_MAX_ROWS, MAX_DECODE_ROWS) run the members, each its own way."""

    def __init__(self, members: list):
        super().__init__()
        if not 1 <= len(members) <= 3:
            raise ValueError("a Triton group takes 1 to 3 members")
        self._members = tuple(members)
        self.in_features = members[0].in_features
        self.wt = nn.Parameter(torch.cat([m.wt for m in members], 1).contiguous(), requires_grad=False)
        self.register_buffer("at", torch.cat([m.at for m in members], 1).contiguous())
        self.register_buffer("U", torch.cat([m.U.reshape(-1) for m in members]))
        self.register_buffer("tau", torch.stack([m.tau.float() for m in members]))
        self.register_buffer("col_scale", torch.stack([m.col_scale for m in members]))
        has_bias = any(m.bias is not None for m in members)
        self.bias = None if not has_bias else nn.Parameter(torch.cat(
            [m.bias if m.bias is not None else m.wt.new_zeros(m.out_features) for m in members]), requires_grad=False)
        self.split = [m.out_features for m in members]
        ranks = [m.at.shape[1] for m in members]
        start = r0 = u0 = 0
        for i, m in enumerate(members):
            n, r = m.out_features, ranks[i]
            m.wt = nn.Parameter(self.wt[:, start:start + n], requires_grad=False)
            m.at = self.at[:, r0:r0 + r]
            m.U = self.U[u0:u0 + n * r].view(n, r)
            m.tau, m.col_scale = self.tau[i], self.col_scale[i]
            if has_bias:
                m.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start, r0, u0 = start + n, r0 + r, u0 + n * r
        self.register_buffer("tile_locks", triton_gemv.tile_locks(sum(self.split), self.wt.device), persistent=False)
        self.seg1, self.seg2 = self._segments(self.split)
        self.roff1, self.roff2 = self._segments(ranks)
        self.max_rows = min(m.max_rows for m in members)  # more rows: each member decides for itself

    @staticmethod
    def _segments(outs: list) -> tuple:
        """Boundaries (first, second) of the members' widths side by side (the total past the last)."""
        bounds = [sum(outs[:i + 1]) for i in range(len(outs))] + [sum(outs)] * 2
        return bounds[0], bounds[1]

    @staticmethod
    def fits(members: list) -> bool:
        """Members start on the fused launch's output tiles."""
        if not 1 <= len(members) <= 3:
            return False
        outs = [m.out_features for m in members]
        return triton_gemv.group_block_n(*TritonGroup._segments(outs), sum(outs), members[0].in_features) is not None

    def joined(self, x):
        """The members' outputs side by side (..., sum of their widths) from one call, or None where the
        rows are more than the group runs on the kernels (each member then decides for itself)."""
        rows = x.reshape(-1, self.in_features)
        if not on_kernels(rows, self.max_rows):
            return None
        if consumer_reduces(self.at, self.wt):
            parts = _partials(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.tile_locks, self.seg1, self.seg2,
                              self.roff1, self.roff2)
            y = triton_gemv.sum_partials(parts, self.bias, rows.dtype)
        else:
            y = torch.ops.rsparse.rsparse_group_gemv(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.tile_locks,
                                                     self.seg1, self.seg2, self.roff1, self.roff2, self.bias, triton_gemv.RANK_TERMS)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x):
        y = self.joined(x)
        return tuple(m(x) for m in self._members) if y is None else y.split(self.split, dim=-1)

    def silu_mul(self, x):
        """SiLU(gate(x)) * up(x) of a gate|up group in one launch pair (the activation runs in the
        kernel's epilogue); more rows than the group runs on the kernels run the members."""
        rows = x.reshape(-1, self.in_features)
        if not on_kernels(rows, self.max_rows) or len(self.split) != 2 or self.split[0] != self.split[1]:
            g, u = self(x)
            return torch.nn.functional.silu(g) * u
        if GATHER == "cuda" and consumer_reduces(self.at, self.wt):  # the CUDA gather's partials, summed and
            y = self.joined(x)  # activated by inductor in one kernel (calls it does not take: Triton partials)
            g, u = y.split(self.split, dim=-1)
            return torch.nn.functional.silu(g) * u
        y = torch.ops.rsparse.rsparse_glu_gemv(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.tile_locks,
                                               self.roff1, self.bias, triton_gemv.RANK_TERMS)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def triton_groups(model, modules: dict) -> dict:
    """{(block, group): TritonGroup} for q/k/v and gate/up where all members are Triton modules in
    `modules` ({key: module}) that fit; built (members become views), not attached."""
    return {key: TritonGroup(mods) for key, mods in group_members(model, modules).items()
            if all(isinstance(m, TritonRSparseLinear) for m in mods) and TritonGroup.fits(mods)}


def to_triton_(model, fuse: bool = True) -> dict:
    """Swap every RSparseLinear of `model` for its Triton twin in place and, with `fuse`, attach the
    q/k/v and gate/up groups that fit; returns {key: module}."""
    from ..apply import backend_candidates
    from ..families import set_group, set_module

    out, padded, dense = {}, 0, 0
    for key, m in backend_candidates(model, "to_triton_").items():
        if type(m) is RSparseLinear:
            out[key] = TritonRSparseLinear(m)
            set_module(model, key, out[key])
            padded += (-m.rank % RANK_ALIGN) * (m.in_features + m.out_features)
            dense += m.in_features * m.out_features
    if padded:
        warnings.warn(f"the plan's ranks are not all multiples of {RANK_ALIGN}: the Triton modules store them padded "
                      f"with zeros and read {100 * padded / dense:.1f}% of the projections' dense bytes more per token "
                      f"than planned (plans from `rsparse calibrate --target gpu` choose ranks in multiples of {RANK_ALIGN})",
                      stacklevel=2)
    if fuse:
        for (i, name), g in triton_groups(model, out).items():
            set_group(model, i, name, g)
    return out
