"""Decode attention kernel (`kernels/attention.py`) against SDPA in float64, on the CPU through Triton's
interpreter (GPU when present): grouped-query heads (G = 1, 3, 4), head dims 32/64, valid lengths that are
not multiples of the slot block, 1-4 splits, sliding windows (spanning several splits, equal to or longer
than the filled length) and soft-caps, and cache slots after pos, or before the window, poisoned with NaN
(the kernel must never read them)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from rsparse.attend import default_attention, masked_attention, rope  # noqa: E402
from rsparse.decode import GraphDecoder  # noqa: E402
from rsparse.kernels.attention import attention_lock, decode_attention, decode_attention_rope, decode_attention_rope_qkv  # noqa: E402
from cases import slow_on_cpu  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,H,HKV,D,L,pos,splits,block_l,dtype,window,cap", [
    (1, 4, 2, 64, 37, 20, 1, 16, torch.float32, 0, 0.0), (2, 6, 2, 64, 50, 49, 3, 16, torch.float32, 0, 0.0),
    (3, 8, 8, 32, 17, 0, 2, 16, torch.float16, 0, 0.0), (1, 12, 3, 64, 130, 100, 4, 32, torch.float32, 0, 0.0),
    (2, 4, 1, 32, 40, 5, 4, 16, torch.float16, 0, 0.0),  # more splits than filled blocks: empty splits merge as nothing
    (1, 4, 2, 64, 130, 100, 4, 16, torch.float32, 37, 0.0),  # the window's 37 slots over 3 splits (merged)
    (2, 6, 2, 64, 50, 49, 3, 16, torch.float32, 50, 0.7),  # window = filled length; a cap that bites
    (2, 4, 1, 32, 90, 80, 4, 16, torch.float16, 20, 2.0), (1, 12, 3, 64, 130, 10, 2, 16, torch.float32, 64, 0.0),
])
def test_decode_attention_matches_masked_sdpa(B, H, HKV, D, L, pos, splits, block_l, dtype, window, cap):
    torch.manual_seed(hash((B, H, HKV, D, L, pos, splits, window)) % 2**31)
    q = torch.randn(B, 1, H, D).transpose(1, 2).to(dtype)  # the decoder's (B, H, 1, D) view
    k, v = torch.randn(B, HKV, L, D).to(dtype), torch.randn(B, HKV, L, D).to(dtype)
    p = torch.tensor([pos])
    ref = masked_attention(q.double(), k.double(), v.double(), p, window or None, cap or None)
    k[:, :, pos + 1:], v[:, :, pos + 1:] = float("nan"), float("nan")
    if window:
        k[:, :, :max(0, pos + 1 - window)], v[:, :, :max(0, pos + 1 - window)] = float("nan"), float("nan")
    o = decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), p.to(DEV), splits, block_l, window=window, softcap=cap).cpu()
    assert o.shape == ref.shape and o.dtype == dtype
    assert torch.isfinite(o).all(), "a slot after pos was read, or an output left unwritten"
    err = ((o.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


@pytest.mark.parametrize("B,H,HKV,D,L,pos,splits,block_l,dtype,cos_rows,window,cap", [
    (1, 4, 2, 64, 37, 20, 1, 16, torch.float32, 1, 0, 0.0), (2, 6, 2, 64, 51, 49, 3, 16, torch.float32, 2, 0, 0.0),  # then the last slot
    (3, 12, 4, 32, 17, 0, 2, 16, torch.float16, 1, 0, 0.0), (2, 4, 1, 32, 70, 33, 4, 16, torch.float16, 2, 0, 0.0),
    (2, 6, 2, 64, 71, 60, 3, 16, torch.float32, 2, 25, 1.5),  # a window over 2 splits, and a cap
])
@pytest.mark.parametrize("joined", [False, True])
def test_fused_attention_rotates_writes_the_slot_and_attends(B, H, HKV, D, L, pos, splits, block_l, dtype, cos_rows, window, cap,
                                                             joined):
    """decode_attention_rope (q, k and v apart, or side by side in one buffer: `_qkv`) against the graphed
    step's unfused path in float64 (rotate q and k, index_copy_ K and V to slot pos, masked SDPA): slot
    pos and every later slot poisoned before the call; afterwards slot pos holds the rotated K and the V,
    the later slots are untouched, no NaN reaches the output, and the split counters are zero again, so
    a second call at the next position on the same counters is right too."""
    torch.manual_seed(hash((B, H, HKV, D, L, pos, splits, cos_rows, joined, window)) % 2**31)
    k_cache, v_cache = torch.randn(B, HKV, L, D).to(dtype), torch.randn(B, HKV, L, D).to(dtype)
    rk, rv = k_cache.double().clone(), v_cache.double().clone()
    k_cache[:, :, pos:], v_cache[:, :, pos:] = float("nan"), float("nan")
    if window:  # slots before the first call's window: never read (the second call's window starts later)
        k_cache[:, :, :pos + 1 - window], v_cache[:, :, :pos + 1 - window] = float("nan"), float("nan")
    kc, vc, lock = k_cache.to(DEV), v_cache.to(DEV), attention_lock(B, HKV, DEV)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for p in (pos, pos + 1):
        qkv = torch.randn(B, 1, (H + 2 * HKV) * D).to(dtype)  # the q|k|v group's output; split below as the decoder does
        q, k_new, v_new = (t.view(B, 1, -1, D).transpose(1, 2) for t in qkv.split([H * D, HKV * D, HKV * D], -1))
        angle = torch.rand(cos_rows, 1, 1, D // 2).repeat(1, 1, 1, 2) * 6.0
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        rk[:, :, p:p + 1], rv[:, :, p:p + 1] = rope(k_new.double(), cos.double(), sin.double()), v_new.double()
        ref = masked_attention(rope(q.double(), cos.double(), sin.double()), rk, rv, torch.tensor([p]), window or None, cap or None)
        pt, cs, sn = torch.tensor([p], device=DEV), cos.to(DEV), sin.to(DEV)
        if joined:
            o = decode_attention_rope_qkv(qkv.to(DEV), cs, sn, kc, vc, pt, lock, splits, block_l, window, cap).cpu()
        else:
            o = decode_attention_rope(q.to(DEV), k_new.to(DEV), v_new.to(DEV), cs, sn, kc, vc, pt, lock, splits, block_l,
                                      window, cap).cpu()
        assert o.shape == ref.shape and o.dtype == dtype and torch.isfinite(o).all()
        assert ((o.double() - ref).norm() / ref.norm()).item() < tol
        assert not lock.any(), "the merging program must leave its counter at zero"
        got_k, got_v = kc.cpu(), vc.cpu()
        assert ((got_k[:, :, p].double() - rk[:, :, p]).norm() / rk[:, :, p].norm()).item() < tol
        assert torch.equal(got_v[:, :, p], v_new[:, :, 0])
        assert got_k[:, :, p + 1:].isnan().all() and got_v[:, :, p + 1:].isnan().all()  # later slots untouched
        torch.testing.assert_close(got_k[:, :, :pos], k_cache[:, :, :pos], rtol=0, atol=0, equal_nan=True)  # earlier slots untouched


def test_decode_attention_refuses_bad_shapes():
    q, k = torch.randn(1, 4, 1, 48), torch.randn(1, 2, 8, 48)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, k, torch.tensor([3]))
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(torch.randn(1, 3, 1, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.tensor([3]))
    with pytest.raises(ValueError, match="attention must be one of"):
        GraphDecoder(torch.nn.Module(), attention="flash")
    q, kc, new, row = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 1, 1, 32)
    lock, p = attention_lock(1, 2, "cpu"), torch.tensor([3])
    with pytest.raises(ValueError, match=r"new K and V must be \(1, 2, 1, 32\)"):
        decode_attention_rope(q, torch.randn(1, 4, 1, 32), new, row, row, kc, kc.clone(), p, lock)
    with pytest.raises(ValueError, match="cos and sin must hold one row of 32"):
        decode_attention_rope(q, new, new, torch.randn(1, 1, 1, 16), row, kc, kc.clone(), p, lock)
    with pytest.raises(ValueError, match="lock must be a contiguous int32 vector of at least batch \\* KV heads = 2"):
        decode_attention_rope(q, new, new, row, row, kc, kc.clone(), p, torch.zeros(2))
    with pytest.raises(ValueError, match="lock must be"):
        decode_attention_rope(q, new, new, row, row, kc, kc.clone(), p, attention_lock(1, 1, "cpu"))
    with pytest.raises(ValueError, match=r"qkv must be \(batch 1, 1, \(H \+ 2 \* 2\) \* 32\)"):
        decode_attention_rope_qkv(torch.randn(1, 1, 7 * 32), row, row, kc, kc.clone(), p, lock)  # H = 3: not a multiple of 2
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention_rope_qkv(torch.randn(1, 1, 4 * 32), row, row, kc, kc.clone(), p, lock)  # no query heads left


def test_default_attention_is_the_kernel_on_cuda_only_where_it_fits(tiny_llama):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert default_attention(cuda, 128, bf16) == "fused" and default_attention(cuda, 64, torch.float32) == "fused"
    assert default_attention(torch.device("cpu"), 128, bf16) == "sdpa"  # the interpreter is for tests, not decoding
    assert default_attention(cuda, 80, bf16) == default_attention(cuda, 8, bf16) == "sdpa"  # not a power of two; below tl.dot's 16
    assert default_attention(cuda, 128, torch.float64) == "sdpa"
    assert GraphDecoder(tiny_llama(), max_len=8).attention == "sdpa"  # CPU: auto is SDPA
    odd = tiny_llama(hidden_size=48, num_attention_heads=2, num_key_value_heads=1)  # head dim 24
    with pytest.raises(ValueError, match="power of two from 16, this model's is 24; use 'sdpa'"):
        GraphDecoder(odd, max_len=8, attention="triton")
    assert GraphDecoder(odd, max_len=8, attention="auto").attention == "sdpa"


# on the CPU both in the slow set: test_families.py runs each kernel in the graphed step, and
# test_kernels.py's fused-groups test the fused one on a Llama
@pytest.mark.parametrize("attention", [slow_on_cpu("triton"), slow_on_cpu("fused")])
def test_graph_decoder_steps_agree_with_triton_attention(tiny_llama, attention):
    """A 2-layer Llama: the step with the kernel (alone, or also rotating and writing the cache) gives
    the SDPA step's logits at every position."""
    torch.manual_seed(0)
    model = tiny_llama().to(DEV)
    ids = torch.randint(0, 50, (2, 5), device=DEV)
    # sdpa named, not "auto": on CUDA "auto" picks the kernel, and ref would compare the kernel with itself
    ref, ours = GraphDecoder(model, max_len=12, batch=2, attention="sdpa"), GraphDecoder(model, max_len=12, batch=2, attention=attention)
    switched = GraphDecoder(model, max_len=12, batch=2, attention="sdpa")  # then switched as --compare-attention does
    assert switched.use_attention(attention) == "sdpa" and switched.attention == attention
    with torch.inference_mode():
        for dec in (ref, ours, switched):
            dec.prefill(ids)
        nxt = ids[:, -1:]
        for p in range(5, 11):
            pos = torch.tensor([p], device=DEV)
            a, b, c = ref.step(nxt, pos), ours.step(nxt, pos), switched.step(nxt, pos)
            assert ((a - b).norm() / a.norm()).item() < 1e-5, p
            assert torch.equal(b, c), p
            nxt = a.argmax(-1, keepdim=True)


def test_switching_attention_keeps_the_decoders_counters(tiny_llama, monkeypatch):
    """The fused attention's split counters belong to the decoder for its life: graphs captured before a
    switch replay onto their address (session 23: counters made per switch were freed, their memory
    reused by a later position tensor, and every graph's steps went wrong)."""
    from rsparse.kernels import attention

    seen, real = [], attention.decode_attention_rope
    monkeypatch.setattr(attention, "decode_attention_rope", lambda *a, **kw: seen.append(a[8]) or real(*a, **kw))
    torch.manual_seed(0)
    dec = GraphDecoder(tiny_llama().to(DEV), max_len=12, attention="fused")
    lock = dec.attn_lock
    assert dec.use_attention("sdpa") == "fused" and dec.use_attention("fused") == "sdpa"
    with torch.inference_mode():
        dec.prefill(torch.randint(0, 50, (1, 5), device=DEV))
        dec.step(torch.tensor([[3]], device=DEV), torch.tensor([5], device=DEV))
    assert seen and all(t is lock for t in seen) and not lock.any()
