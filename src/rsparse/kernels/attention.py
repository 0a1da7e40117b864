"""Decode attention over a static KV cache (one query position), for `decode.GraphDecoder`.

o[b, h] = softmax(cap(q[b, h] K[b, h // G, a:n]^T * scale)) V[b, h // G, a:n], n = pos + 1, G = H / HKV
(grouped-query heads share their KV head), a = max(0, n - window) for a sliding window (0: none, a = 0),
cap(s) = softcap * tanh(s / softcap) (Gemma 2; softcap 0: none). SDPA in the graphed step reads the
whole cache under a mask (every slot, every step: the shapes must stay static for CUDA graphs); this
kernel reads the valid length from the `pos` tensor inside the kernel, so it reads only the n - a
slots in use and the graph still replays the same launch every step.

Layout: q (B, H, 1, D), caches (B, HKV, L, D), any strides with D contiguous; D a power of two (64,
128). Grid (B * HKV, SPLITS): a program takes one KV head's G query heads (padded to 16 rows, the
smallest tl.dot M) over its share of the slots, BLOCK_L slots per step, online softmax in float32.
With SPLITS > 1 each split writes its (max, sum, accumulator) partials and the program drawing the
last ticket of its head (a counter per head, acquire-release) merges them in split order
(deterministic), writes o in q's dtype and zeroes the counter again: `decode_attention` zero-fills
fresh counters per call, the rotating ops take the caller's (`attention_lock`, zeroed once), which
under torch.compile saves a zero-fill kernel per layer. Splits past the filled slots return at once: only the
used ones (cdiv(n, slots per split)) store partials and draw tickets, and the merge reads only theirs;
one used split writes o itself (session 13: the partials path cost ~2 µs at 64 filled slots).
`decode_attention_rope` (the decoder's "fused" attention) also takes the new position's K and V
before rotary embedding and the step's cos / sin: every program applies the rotation to its query
heads, and the program whose split holds slot pos rotates its head's K, writes K and V to that slot
(then a CTA barrier, so its own loop reads them back): rotation, cache write and attention in one
launch instead of inductor's three or four kernels around index_copy_. `decode_attention_rope_qkv`
takes q, k and v as one buffer side by side (a fused q|k|v call's output): compiled, inductor then
writes that buffer (the sum of the gather's partials) in one kernel, where three views of it as
separate inputs cost one kernel each (session 22's output code). The rotation is computed in
float32 and rounded once to the cache dtype (as inductor's fused kernels do).
Eager reference: `attend.masked_attention` (SDPA, mask). The graphed step's default on CUDA
(`attend.default_attention`): session 14's end-to-end A/B, one run, Llama-3-8B shapes, batch 1,
compiled: dense 186.3 -> 191.2 tok/s, 50% sparse 304.3 -> 315.5 against SDPA over the masked cache.
"""
import torch
import triton
import triton.language as tl

from .counters import check_counters, counters


@triton.jit
def _rotate(x_ptr, cs, sn, d, D: tl.constexpr):
    """Rotary embedding of the vectors at x_ptr + d (rows broadcast in x_ptr's shape), in float32:
    x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + D/2] (d < D/2), x[d - D/2] (d >= D/2)."""
    x = tl.load(x_ptr + d).to(tl.float32)
    xr = tl.load(x_ptr + (d + D // 2) % D).to(tl.float32)
    return x * cs + tl.where(d < D // 2, -xr, xr) * sn


@triton.jit
def _decode_attention(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, part_ptr, lock_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, HKV, WINDOW,
                      sqb, sqh, skb, skh, skl, svb, svh, svl, sob, soh, kno, sknb, sknh, vno, svnb, svnh, scb,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS: tl.constexpr,
                      SCALE: tl.constexpr, ROPE: tl.constexpr, SOFTCAP: tl.constexpr):
    head, split = tl.program_id(0), tl.program_id(1)
    b, kvh = head // HKV, head % HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gm = g < G
    n = tl.load(pos_ptr).to(tl.int32) + 1
    if ROPE:  # q and the new K arrive unrotated: rotate, rounding once to the cache dtype
        cs = tl.load(cos_ptr + b * scb + d).to(tl.float32)[None, :]
        sn = tl.load(sin_ptr + b * scb + d).to(tl.float32)[None, :]
        rows = q_ptr + b * sqb + (kvh * G + tl.minimum(g, G - 1))[:, None] * sqh  # padded rows: a real row, zeroed
        q = tl.where(gm[:, None], _rotate(rows, cs, sn, d[None, :], D), 0.0).to(k_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + b * sqb + (kvh * G + g)[:, None] * sqh + d[None, :], mask=gm[:, None], other=0.0)
    first = tl.maximum(n - WINDOW, 0)  # the oldest slot the query sees (no window: WINDOW = 2^30)
    per = tl.cdiv(tl.cdiv(n - first, SPLITS), BLOCK_L) * BLOCK_L  # slots per split, whole steps
    used = tl.cdiv(n - first, per)  # splits with slots; the rest return at once (no stores, no ticket)
    lo = first + split * per
    if lo < n:
        hi = tl.minimum(lo + per, n)
        if ROPE:
            if hi == n:  # this split holds slot pos: write the new K (rotated) and V there, then read them back
                kn = _rotate(kn_ptr + kno + b * sknb + kvh * sknh, cs, sn, d[None, :], D)
                tl.store(k_ptr + b * skb + kvh * skh + (n - 1) * skl + d[None, :], kn.to(k_ptr.dtype.element_ty))
                vn = tl.load(vn_ptr + vno + b * svnb + kvh * svnh + d)
                tl.store(v_ptr + b * svb + kvh * svh + (n - 1) * svl + d, vn.to(v_ptr.dtype.element_ty))
                tl.debug_barrier()
        m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((GP,), dtype=tl.float32)
        acc = tl.zeros((GP, D), dtype=tl.float32)
        kb = k_ptr + b * skb + kvh * skh
        vb = v_ptr + b * svb + kvh * svh
        for s0 in range(lo, hi, BLOCK_L):
            s = s0 + tl.arange(0, BLOCK_L)
            sm = s < hi
            k = tl.load(kb + s[:, None] * skl + d[None, :], mask=sm[:, None], other=0.0)
            v = tl.load(vb + s[:, None] * svl + d[None, :], mask=sm[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
            if SOFTCAP > 0:  # tanh from one exp of -2|s/c| (no overflow): sign(s) (1 - e) / (1 + e)
                e = tl.exp(-2.0 * tl.abs(sc) / SOFTCAP)
                sc = tl.where(sc < 0, -SOFTCAP, SOFTCAP) * (1.0 - e) / (1.0 + e)
            sc = tl.where(sm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        o_rows = o_ptr + b * sob + (kvh * G + g)[:, None] * soh + d[None, :]
        if used == 1:  # one split holds every filled slot (always so at SPLITS 1): no partials, no ticket
            tl.store(o_rows, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
        else:
            # partials of (head, split): [m (GP), l (GP), acc (GP * D)]; every used split has a slot, so m
            # is finite on all GP rows (padded rows score 0) and the merge below never sees -inf - -inf
            stride = GP * (D + 2)
            base = part_ptr + (head * SPLITS + split) * stride
            tl.store(base + g, m_i)
            tl.store(base + GP + g, l_i)
            tl.store(base + 2 * GP + g[:, None] * D + d[None, :], acc)
            ticket = tl.atomic_add(lock_ptr + head, 1, sem="acq_rel")
            if ticket == used - 1:
                # one online pass over the used splits, in split order (deterministic)
                m_all = tl.full((GP,), float("-inf"), dtype=tl.float32)
                l_all = tl.zeros((GP,), dtype=tl.float32)
                o = tl.zeros((GP, D), dtype=tl.float32)
                for sp in range(0, used):
                    pb = part_ptr + (head * SPLITS + sp) * stride
                    m_s = tl.load(pb + g, cache_modifier=".cg")
                    m_new = tl.maximum(m_all, m_s)
                    c_old, c_s = tl.exp(m_all - m_new), tl.exp(m_s - m_new)
                    l_all = l_all * c_old + c_s * tl.load(pb + GP + g, cache_modifier=".cg")
                    o = o * c_old[:, None] + c_s[:, None] * tl.load(pb + 2 * GP + g[:, None] * D + d[None, :], cache_modifier=".cg")
                    m_all = m_new
                tl.store(o_rows, (o / l_all[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
                # every used split has drawn its ticket: leave the counter zeroed for the next call, so a
                # caller's persistent counter needs no zero-fill launch per call
                tl.store(lock_ptr + head, 0)


def _check(q, k_cache, v_cache, pos):
    if q.dim() != 4 or q.shape[2] != 1 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode attention needs q (B, H, 1, D) and caches (B, HKV, L, D), got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, _, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or H % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} (batch, head dim, heads per KV head)")
    if D & (D - 1) or q.stride(3) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(f"head dim must be a power of two and contiguous, got {D}")
    if pos.numel() != 1:
        raise ValueError(f"pos must hold one position, got {pos.numel()}")


def _check_new(q, k_new, v_new, cos, sin, k_cache):
    B, H, _, D = q.shape
    want = (B, k_cache.shape[1], 1, D)
    if tuple(k_new.shape) != want or tuple(v_new.shape) != want or k_new.stride(3) != 1 or v_new.stride(3) != 1:
        raise ValueError(f"the new K and V must be {want} with the head dim contiguous, got {tuple(k_new.shape)}, "
                         f"{tuple(v_new.shape)}")
    for t in (cos, sin):
        if t.shape[-1] != D or t.numel() not in (D, B * D) or t.stride(-1) != 1 or (t.numel() > D and t.shape[0] != B):
            raise ValueError(f"cos and sin must hold one row of {D} (or one per batch row, batch first), got {tuple(t.shape)}")


def attention_lock(batch: int, kv_heads: int, device) -> torch.Tensor:
    """The split counters `decode_attention_rope` takes (`counters`: zeroed once, every call leaves them
    zeroed; keep them alive while any CUDA graph that captured a call may replay)."""
    return counters(batch * kv_heads, device)


def _launch(q, k_cache, v_cache, pos, splits, block_l, window, softcap, new=None, lock=None, joined=None):
    """joined (qkv, k offset, v offset): q, k_new and v_new are views of qkv, which the kernel gets as
    its one input at those element offsets (views passed apart would each become an input buffer)."""
    B, H, _, D = q.shape
    HKV = k_cache.shape[1]
    G = H // HKV
    GP = max(16, triton.next_power_of_2(G))
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    part = torch.empty(B * HKV * splits * GP * (D + 2) if splits > 1 else 1, dtype=torch.float32, device=q.device)
    if lock is None:  # tickets only where splits are merged (else the pointer is unused: no zero-fill launch)
        lock = counters(B * HKV, q.device) if splits > 1 else part
    k_new, v_new, cos, sin = new if new is not None else (q, q, q, q)  # unused pointers without ROPE
    cos_b = cos.stride(0) if new is not None and cos.numel() > D else 0
    q_in, kn_in, vn_in, kno, vno = (joined[0],) * 3 + joined[1:] if joined is not None else (q, k_new, v_new, 0, 0)
    torch.library.wrap_triton(_decode_attention)[(B * HKV, splits)](
        q_in, k_cache, v_cache, pos, o, part, lock, kn_in, vn_in, cos, sin, HKV, window if window > 0 else 1 << 30,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
        kno, k_new.stride(0), k_new.stride(1), vno, v_new.stride(0), v_new.stride(1), cos_b,
        G=G, GP=GP, D=D, BLOCK_L=block_l, SPLITS=splits, SCALE=D**-0.5, ROPE=new is not None,
        SOFTCAP=float(softcap))
    return o


def _rope_launch(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, lock, splits, block_l, window, softcap, joined=None):
    _check(q, k_cache, v_cache, pos)
    _check_new(q, k_new, v_new, cos, sin, k_cache)
    need = q.shape[0] * k_cache.shape[1]
    check_counters(lock, need, "lock", f"batch * KV heads = {need}", q.device, "attention_lock")
    return _launch(q, k_cache, v_cache, pos, splits, block_l, window, softcap, (k_new, v_new, cos, sin), lock, joined)


@torch.library.triton_op("rsparse::decode_attention", mutates_args={})
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     splits: int = 1, block_l: int = 64, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Attention of the query at position pos[0] over cache slots 0..pos[0] (`attend.masked_attention`),
    the last `window` of them (0: all), scores soft-capped at `softcap` (0: not); returns (B, H, 1, D)
    in q's dtype."""
    _check(q, k_cache, v_cache, pos)
    return _launch(q, k_cache, v_cache, pos, splits, block_l, window, softcap)


@torch.library.triton_op("rsparse::decode_attention_rope", mutates_args={"k_cache", "v_cache", "lock"})
def decode_attention_rope(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, lock: torch.Tensor,
                          splits: int = 1, block_l: int = 64, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """`decode_attention` of the unrotated query q after writing the new position's K (rotated) and V
    (k_new, v_new (B, HKV, 1, D), unrotated) to slot pos[0] of the caches: cos / sin the position's
    rotary rows (D values, or one row per batch row); lock the split counters (`attention_lock`).
    Returns (B, H, 1, D) in q's dtype."""
    return _rope_launch(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, lock, splits, block_l, window, softcap)


@torch.library.triton_op("rsparse::decode_attention_rope_qkv", mutates_args={"k_cache", "v_cache", "lock"})
def decode_attention_rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, pos: torch.Tensor, lock: torch.Tensor, splits: int = 1,
                              block_l: int = 64, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """`decode_attention_rope` of the q|k|v projections' outputs side by side, qkv (B, 1, (H + 2 HKV) D)
    (a fused q|k|v call's one output): one input buffer, so a compiler that computes it (the sum of the
    gather's partials) writes it in one kernel rather than one per view: the kernel gets qkv itself, with
    k's and v's element offsets (views of it, even made inside this op, are traced as inputs of their
    own: session 23's profile). Returns (B, H, 1, D)."""
    B, HKV, _, D = k_cache.shape
    heads = qkv.shape[-1] // D - 2 * HKV if qkv.dim() == 3 else 0
    if qkv.dim() != 3 or qkv.shape[:2] != (B, 1) or qkv.shape[-1] % D or heads < HKV or heads % HKV or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be (batch {B}, 1, (H + 2 * {HKV}) * {D}) with H a multiple of {HKV} and the last dim "
                         f"contiguous, got {tuple(qkv.shape)}")
    y = qkv.unflatten(-1, (-1, D)).transpose(1, 2)  # (B, H + 2 HKV, 1, D): the decoder's per-head views
    return _rope_launch(y[:, :heads], y[:, heads:heads + HKV], y[:, heads + HKV:], cos, sin, k_cache, v_cache, pos, lock,
                        splits, block_l, window, softcap, (qkv, heads * D, (heads + HKV) * D))
