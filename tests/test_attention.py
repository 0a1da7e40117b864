"""Decode attention kernel (`kernels/attention.py`) against SDPA in float64, on the CPU through Triton's
interpreter (GPU when present): grouped-query heads (G = 1, 3, 4), head dims 32/64, valid lengths that are
not multiples of the slot block, 1-4 splits, and cache slots after pos poisoned with NaN (the kernel must
never read them)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from rsparse.decode import GraphDecoder, default_attention, masked_attention  # noqa: E402
from rsparse.kernels.attention import decode_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,H,HKV,D,L,pos,splits,block_l,dtype", [
    (1, 4, 2, 64, 37, 20, 1, 16, torch.float32), (2, 6, 2, 64, 50, 49, 3, 16, torch.float32),
    (3, 8, 8, 32, 17, 0, 2, 16, torch.float16), (1, 12, 3, 64, 130, 100, 4, 32, torch.float32),
    (2, 4, 1, 32, 40, 5, 4, 16, torch.float16),  # more splits than filled blocks: empty splits merge as nothing
])
def test_decode_attention_matches_masked_sdpa(B, H, HKV, D, L, pos, splits, block_l, dtype):
    torch.manual_seed(hash((B, H, HKV, D, L, pos, splits)) % 2**31)
    q = torch.randn(B, 1, H, D).transpose(1, 2).to(dtype)  # the decoder's (B, H, 1, D) view
    k, v = torch.randn(B, HKV, L, D).to(dtype), torch.randn(B, HKV, L, D).to(dtype)
    p = torch.tensor([pos])
    ref = masked_attention(q.double(), k.double(), v.double(), p)
    k[:, :, pos + 1:], v[:, :, pos + 1:] = float("nan"), float("nan")
    o = decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), p.to(DEV), splits, block_l).cpu()
    assert o.shape == ref.shape and o.dtype == dtype
    assert torch.isfinite(o).all(), "a slot after pos was read, or an output left unwritten"
    err = ((o.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def test_decode_attention_refuses_bad_shapes():
    q, k = torch.randn(1, 4, 1, 48), torch.randn(1, 2, 8, 48)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, k, torch.tensor([3]))
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(torch.randn(1, 3, 1, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.tensor([3]))
    with pytest.raises(ValueError, match="attention must be one of"):
        GraphDecoder(torch.nn.Module(), attention="flash")


def test_default_attention_is_the_kernel_on_cuda_only_where_it_fits(tiny_llama):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert default_attention(cuda, 128, bf16) == "triton" and default_attention(cuda, 64, torch.float32) == "triton"
    assert default_attention(torch.device("cpu"), 128, bf16) == "sdpa"  # the interpreter is for tests, not decoding
    assert default_attention(cuda, 80, bf16) == default_attention(cuda, 8, bf16) == "sdpa"  # not a power of two; below tl.dot's 16
    assert default_attention(cuda, 128, torch.float64) == "sdpa"
    assert GraphDecoder(tiny_llama(), max_len=8).attention == "sdpa"  # CPU: auto is SDPA
    odd = tiny_llama(hidden_size=48, num_attention_heads=2, num_key_value_heads=1)  # head dim 24
    with pytest.raises(ValueError, match="power of two from 16, this model's is 24; use 'sdpa'"):
        GraphDecoder(odd, max_len=8, attention="triton")
    assert GraphDecoder(odd, max_len=8, attention="auto").attention == "sdpa"


def test_graph_decoder_steps_agree_with_triton_attention(tiny_llama):
    """A 2-layer Llama: the step with the kernel gives the SDPA step's logits at every position."""
    torch.manual_seed(0)
    model = tiny_llama().to(DEV)
    ids = torch.randint(0, 50, (2, 5), device=DEV)
    # sdpa named, not "auto": on CUDA "auto" picks triton, and ref would compare the kernel with itself
    ref, ours = GraphDecoder(model, max_len=12, batch=2, attention="sdpa"), GraphDecoder(model, max_len=12, batch=2, attention="triton")
    switched = GraphDecoder(model, max_len=12, batch=2, attention="sdpa")  # then switched as --compare-attention does
    assert switched.use_attention("triton") == "sdpa" and switched.attention == "triton"
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
