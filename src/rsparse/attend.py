"""Attention for the decode loops (`decode.py`): the rotary embedding, the eager attention over a slice
of the cache, and the graphed step's attention paths.

o = softmax(cap(q K^T / sqrt(D)) + mask) V per head, grouped-query heads sharing their KV head; cap
is Gemma 2's soft-capping c * tanh(s / c) (None: none); the mask allows key position j for query
position i where j <= i and, in a block with a sliding window w, j > i - w (the HF masks' rule: a
window of w positions, the query's own included). A family's other attention scale (Granite, Gemma)
is applied to q before the rotation (linear), so every path keeps the default 1/sqrt(D).
Graphed step paths (`GraphDecoder.use_attention`): attend(q, k, v, cos, sin, k_cache, v_cache, pos,
ctx) rotates q and k, writes K and V to slot pos and attends; ctx comes from `step_context(pos,
window)` once per step and window: "sdpa" the slot mask (every slot, the unused ones masked: the
shapes stay static for CUDA graphs), "triton" / "fused" the window itself (the kernels read pos).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rope(x, cos, sin):
    """The rotary embedding of x's last dim; where cos is narrower (a partial rotary embedding, e.g.
    Phi-4-mini's), of its first cos.shape[-1] dims, the rest passed through."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def attention(q, k, v, mask=None, softcap: float | None = None, causal: bool = False):
    """q (B, H, T, D) over k, v (B, HKV, S, D); mask (broadcast to (B, H, T, S), True = attend) or
    `causal`. SDPA without a cap; with one, the scores are formed, capped and soft-maxed here."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=True)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = torch.tanh(s / softcap) * softcap
    if causal and mask is None:
        mask = window_mask(0, q.shape[2], k.shape[2], None, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(q.dtype) @ v


def _sees(i, j, window: int | None):
    """Whether query position i sees key position j (broadcast): j <= i, and within the window."""
    keep = j <= i
    return keep if window is None else keep & (j > i - window)


def window_mask(first: int, rows: int, slots: int, window: int | None, device):
    """[rows, slots]: query positions first..first+rows-1 against key positions 0..slots-1."""
    return _sees(torch.arange(first, first + rows, device=device)[:, None], torch.arange(slots, device=device)[None, :], window)


def _slot_mask(slots: int, pos, window: int | None = None):
    """[1, 1, 1, slots]: the cache slots up to pos (and within the window), once per step and window."""
    return _sees(pos, torch.arange(slots, device=pos.device), window)[None, None, None, :]


def masked_attention(q, k_cache, v_cache, pos, window: int | None = None, softcap: float | None = None):
    """The graphed step's attention over every cache slot, slots after pos (or before its window) masked."""
    return attention(q, k_cache, v_cache, _slot_mask(k_cache.shape[2], pos, window), softcap)


def _written_then_attended(attend):
    """attend(q, k, v, cos, sin, k_cache, v_cache, pos, ctx) of the graphed step from an attention over
    the cache: rotary embedding, K and V written to slot pos (index_copy_), then attend(q, caches, pos, ctx)."""
    def step(q, k, v, cos, sin, k_cache, v_cache, pos, ctx):
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        return attend(q, k_cache, v_cache, pos, ctx)
    return step


def _masked(softcap):
    return _written_then_attended(lambda q, k_cache, v_cache, pos, mask: attention(q, k_cache, v_cache, mask, softcap))


def _triton(splits: int, softcap):
    from .kernels.attention import decode_attention  # here: Triton is an optional dependency

    return _written_then_attended(lambda q, k_cache, v_cache, pos, window: decode_attention(
        q, k_cache, v_cache, pos, splits, window=window or 0, softcap=softcap or 0.0))


def _fused(splits: int, lock: torch.Tensor, softcap):
    """(attend, attend_qkv) on `kernels.attention`'s rotating kernel with the split counters `lock`."""
    from .kernels.attention import decode_attention_rope, decode_attention_rope_qkv

    cap = softcap or 0.0

    def attend(q, k, v, cos, sin, k_cache, v_cache, pos, window):
        return decode_attention_rope(q, k, v, cos, sin, k_cache, v_cache, pos, lock, splits, window=window or 0, softcap=cap)

    def attend_qkv(qkv, cos, sin, k_cache, v_cache, pos, window):
        return decode_attention_rope_qkv(qkv, cos, sin, k_cache, v_cache, pos, lock, splits, window=window or 0, softcap=cap)
    return attend, attend_qkv


ATTENTION = ("sdpa", "triton", "fused")


def paths(attention_: str, slots: int, splits: int, lock: torch.Tensor, softcap: float | None):
    """(step_context(pos, window), attend, attend_qkv or None) of a graphed step's attention path."""
    if attention_ == "sdpa":
        return (lambda pos, window: _slot_mask(slots, pos, window)), _masked(softcap), None
    if attention_ == "triton":
        return (lambda pos, window: window), _triton(splits, softcap), None
    return (lambda pos, window: window), *_fused(splits, lock, softcap)


def default_attention(device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    """"fused" on a CUDA device when Triton is installed and the cache suits the kernel (head dim a
    power of two from 16, float16/bfloat16/float32), else "sdpa". On an H200 (Llama-3-8B shapes, batch
    1): the kernel made the compiled dense step 2.6% and the 50% sparse step 3.7% faster than SDPA over
    the masked cache (session 14, one run); fusing the rotation and the cache write into it took the
    graphed eager 50% step from 1301 to 917 launches and 4.96 to 4.09 ms (sessions 21 and 22, two
    runs) and left the compiled steps within their compile-to-compile spread (session 22 A/B: sparse
    322.8 -> 325.0 tok/s, tuned dense 224.1 -> 232.0; one compile each)."""
    import importlib.util

    ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return "fused" if ok and kernel_head_dim(head_dim) and dtype in (torch.float16, torch.bfloat16, torch.float32) else "sdpa"


def kernel_head_dim(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0  # tl.dot's smallest K; the kernel's aranges need a power of two


def attention_splits(batch: int, kv_heads: int) -> int:
    """Splits of the cache slots per KV head for `kernels.attention` in the graphed step: about 128
    programs in all, 1 to 16 splits."""
    return max(1, min(16, 128 // (batch * kv_heads)))
