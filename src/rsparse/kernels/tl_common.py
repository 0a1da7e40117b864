"""Triton device functions shared by the decode kernels (`triton_gemv`, `splitk`).

A program compacts the indices of one chunk's kept channels (|x_j| c_j > tau for any row) into a private
scratch row (`_compact_chunk`), then gathers only those Wt rows (`_gather_rows`; each K step
`_rows_product`, tl.dot with the rows padded to BB); `_tile_acc` does both for one output tile and
chunk, `_store_partial` stores its float32 partial, `_sum_partials` sums such partials over the chunks.
`_silu_mul` rounds SiLU(gate) * up like the unfused module path; `gather_grid` (host) sizes a gather's
launch and scratch.

Device functions return products, never loaded tensors in a tuple: one that did made torch's kernel
analysis report x_ptr and c_ptr as written, so inductor would copy them on every call (session 10's
review).

Measured on the H200 and removed (docs/perf-gpu.md): a gather without compaction, each K step's rows
loaded under their keep mask (1.6x slower, session 11); a tile-major Wt, each output tile's rows one
contiguous slab (the same time as row-major on 8 shapes, session 12; code at b7eb6ce); the kept index
list held in registers, each K step's row picked by a masked sum so that no loop load feeds an address
(25-35% slower on the MLP shapes, session 13; code at 17360c1).
A program's channel offsets stay `start + tl.arange(...)`, limits in the load masks: offsets built with
`tl.where` (lanes past a limit sent to IN) cost 0.39-0.63x per gather on their own (session 20,
`benchmarks/gpu_offsets.py`).
"""
import torch
import triton
import triton.language as tl

BB = 16  # rows padded to the smallest tl.dot M; decode batches are 1..8


def gather_grid(in_f: int, out_f: int, cfg: dict, device):
    """(ntile, nchunk, scratch) of a gather launch over (out_f / block_n tiles, in_f / chunk chunks):
    its grid and the programs' private index rows for `_compact_chunk` (int32, one chunk each)."""
    ch = cfg["chunk"]
    nchunk, ntile = triton.cdiv(in_f, ch), triton.cdiv(out_f, cfg["block_n"])
    return ntile, nchunk, torch.empty(ntile * nchunk * ch, dtype=torch.int32, device=device)


@triton.jit
def _keep(x, c, tau, valid):
    """The keep rule of every kernel: |x_j| c_j > tau, in float32 (as the oracle decides it), where valid."""
    return (tl.abs(x.to(tl.float32)) * c.to(tl.float32)[None, :] > tau) & valid


@triton.jit
def _rows_product(x_ptr, c_ptr, tau, wt_ptr, j, km, rows, n, B, IN, OUT, LDW):
    """One K step: x[:, j] (each row's own kept entries only) times Wt[j, n] for the listed channels j
    (mask km), as a float32 (rows, n) tile. Returns the product alone: a device function that returned
    the loaded x in a tuple made torch's kernel analysis report x_ptr and c_ptr as written."""
    xv = tl.load(x_ptr + rows[:, None] * IN + j[None, :], mask=(rows[:, None] < B) & km[None, :], other=0.0)
    cj = tl.load(c_ptr + j, mask=km, other=0.0)
    xv = tl.where(_keep(xv, cj, tau, True), xv, 0.0)
    w = tl.load(wt_ptr + j[:, None].to(tl.int64) * LDW + n[None, :], mask=km[:, None] & (n[None, :] < OUT), other=0.0)
    return tl.dot(xv.to(w.dtype), w, input_precision="ieee")


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
        acc += _rows_product(x_ptr, c_ptr, tau, wt_ptr, j, km, rows, n, B, IN, OUT, LDW)
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
def _sum_partials(ptr, rows, cols, cmask, B, W, c0, NCHUNK, BB: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                  CACHE: tl.constexpr):
    """(BB, N) tile: each row's sum over the float32 partials [c0, min(c0 + NP, NCHUNK)) laid out
    (NCHUNK, B, W), at columns cols (cmask). A row's partials arrive as one (NP, N) load and one tl.sum
    (independent loads in flight together: summed one partial at a time, a chain of dependent loads,
    they cost ~30-100 us per call, session 6). CACHE: the loads' cache modifier (".cg" where other
    programs of the same launch wrote them)."""
    ch = c0 + tl.arange(0, NP)
    acc = tl.zeros((BB, N), dtype=tl.float32)
    for b in range(0, B):
        t = tl.load(ptr + ch[:, None] * (B * W) + b * W + cols[None, :], mask=(ch[:, None] < NCHUNK) & cmask[None, :], other=0.0,
                    cache_modifier=CACHE)
        acc = tl.where(rows[:, None] == b, tl.sum(t, axis=0)[None, :], acc)
    return acc


@triton.jit
def _silu_mul(g, u, dt: tl.constexpr):
    """SiLU(g) * u rounded like the module path: each member's output, SiLU and the product in dt."""
    g = g.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return a * u.to(dt).to(tl.float32)


@triton.jit
def _tile_acc(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, pid_n, chunk, B, IN, OUT, LDW, SEG1, SEG2,
              CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Output tile pid_n over input chunk `chunk` (float32), with the tile's member's threshold and
    scales: compact the chunk's kept channels into a private scratch row and gather their Wt rows."""
    rows = tl.arange(0, BB)
    n0 = pid_n * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    p = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
    tau = tl.load(tau_ptr + p)
    cp = c_ptr + p * IN
    base = scratch_ptr + (pid_n * tl.cdiv(IN, CHUNK) + chunk) * CHUNK
    cnt = _compact_chunk(x_ptr, cp, tau, base, chunk * CHUNK + tl.arange(0, CHUNK), rows, B, IN)
    return _gather_rows(x_ptr, cp, tau, wt_ptr, base, cnt, rows, n, B, IN, OUT, LDW, BB, BLOCK_K, BLOCK_N)


@triton.jit
def _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BB)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(ypart_ptr + chunk * B * OUT + rows[:, None] * OUT + n[None, :], acc, mask=(rows[:, None] < B) & (n[None, :] < OUT))
