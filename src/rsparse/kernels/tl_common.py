"""Triton device functions shared by the decode kernels (`triton_gemv`, `splitk`).

A program compacts the indices of one chunk's kept channels (|x_j| c_j > tau for any row) into a
private scratch row (`_compact_chunk`), then gathers only those Wt rows (`_gather_rows`, tl.dot with
the rows padded to BB). `_silu_mul` rounds SiLU(gate) * up like the unfused module path.
"""
import triton
import triton.language as tl

BB = 16  # rows padded to the smallest tl.dot M; decode batches are 1..8


@triton.jit
def _keep(x, c, tau, valid):
    """The keep rule of every kernel: |x_j| c_j > tau, in float32 (as the oracle decides it), where valid."""
    return (tl.abs(x.to(tl.float32)) * c.to(tl.float32)[None, :] > tau) & valid


@triton.jit
def _gather_rows(x_ptr, c_ptr, tau, wt_ptr, idx_base, cnt, rows, n, B, IN, OUT, LDW,
                 BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over the `cnt` kept channels listed at idx_base of x[:, j] * Wt[j, n] (float32 tile);
    each row keeps only its own kept entries of the union."""
    acc = tl.zeros((BB, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, cnt, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < cnt
        j = tl.load(idx_base + kk, mask=km, other=0)
        xv = tl.load(x_ptr + rows[:, None] * IN + j[None, :], mask=(rows[:, None] < B) & km[None, :], other=0.0)
        cj = tl.load(c_ptr + j, mask=km, other=0.0)
        xv = tl.where(_keep(xv, cj, tau, True), xv, 0.0)
        w = tl.load(wt_ptr + j[:, None].to(tl.int64) * LDW + n[None, :], mask=km[:, None] & (n[None, :] < OUT), other=0.0)
        acc += tl.dot(xv.to(w.dtype), w, input_precision="ieee")
    return acc


@triton.jit
def _compact_chunk(x_ptr, c_ptr, tau, base, offs, rows, B, IN):
    """Indices of the channels `offs` kept by any row, written to this program's private scratch row
    `base` (x chunk re-read from L2, CTA barrier before use); returns their count."""
    valid = (rows[:, None] < B) & (offs[None, :] < IN)
    xc = tl.load(x_ptr + rows[:, None] * IN + offs[None, :], mask=valid, other=0.0)
    cc = tl.load(c_ptr + offs, mask=offs < IN, other=0.0)
    keep_any = tl.max(_keep(xc, cc, tau, valid).to(tl.int32), axis=0)
    pos = tl.cumsum(keep_any, axis=0) - 1
    tl.store(base + pos, offs, mask=keep_any > 0)
    tl.debug_barrier()
    return tl.sum(keep_any, axis=0)


@triton.jit
def _silu_mul(g, u, dt: tl.constexpr):
    """SiLU(g) * u rounded like the module path: each member's output, SiLU and the product in dt."""
    g = g.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return a * u.to(dt).to(tl.float32)
