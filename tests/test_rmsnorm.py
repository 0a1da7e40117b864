"""Residual add + RMSNorm kernel (`kernels/rmsnorm.py`) against Hugging Face's LlamaRMSNorm and a float64
reference, on the CPU through Triton's interpreter (GPU when present): widths that are not powers of
two, 1-3 rows, random norm weights; and the decoder's fused norm against its PyTorch one, eager and
traced."""
import pytest
import torch

triton = pytest.importorskip("triton")

from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from rsparse.decode import GraphDecoder, default_norm  # noqa: E402
from rsparse.kernels import rmsnorm  # noqa: E402
from rsparse.kernels.rmsnorm import add_rms_norm, rms_norm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _norm(n, dtype, eps):
    m = LlamaRMSNorm(n, eps=eps)
    with torch.no_grad():
        m.weight.copy_(torch.rand(n) * 2 - 0.5)
    return m.to(DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,eps", [((1, 1, 100), 1e-5), ((3, 1, 576), 1e-6), ((2, 1000), 1e-5), ((1, 1, 4096), 1e-6)])
def test_add_rms_norm_matches_llama_rmsnorm(dtype, shape, eps):
    torch.manual_seed(hash((shape, eps, str(dtype))) % 2**31)
    h = (torch.randn(shape) * 3).to(DEV, dtype)
    d = torch.randn(shape).to(DEV, dtype)
    norm = _norm(shape[-1], dtype, eps)
    s, y = add_rms_norm(h, d, norm.weight, eps)
    assert s.shape == y.shape == h.shape and s.dtype == y.dtype == dtype
    assert torch.equal(s, h + d)  # the residual stream rounds as PyTorch's add
    with torch.no_grad():
        ref = norm(h + d)
    x = (h + d).double()
    exact = norm.weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    err, ref_err = ((y.double() - exact).norm() / exact.norm()).item(), ((ref.double() - exact).norm() / exact.norm()).item()
    assert torch.isfinite(y).all() and err <= 2 * ref_err + 1e-7, (err, ref_err)  # as close as the module itself
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # low precision: an element may round the other way
    assert ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item() < tol
    y1 = rms_norm(h, norm.weight, eps)
    with torch.no_grad():
        assert ((y1.double() - norm(h).double()).abs().max() / norm(h).double().abs().max()).item() < tol


def test_rms_norm_refuses_what_it_cannot_compute():
    h, w = torch.randn(1, 64), torch.ones(64)
    with pytest.raises(ValueError, match=r"weight \(N,\) of their dtype, got rows \(1, 64\) torch.float32, weight \(64,\) torch.float16"):
        rms_norm(h, w.half(), 1e-5)
    with pytest.raises(ValueError, match="N <= 16384"):
        rms_norm(torch.randn(1, 16400), torch.ones(16400), 1e-5)
    with pytest.raises(ValueError, match="residual branch must match the rows"):
        add_rms_norm(h, torch.randn(2, 64), w, 1e-5)


def test_decoder_fused_norm_agrees_eager_and_keeps_the_expression_when_traced(tiny_llama, monkeypatch):
    """Eager steps with norm="fused" call the kernel for every norm (2 per block + the final one) and give
    the PyTorch norm's logits; a traced step (torch.compile, aot_eager) never calls it and agrees too."""
    calls = []
    for name in ("rms_norm", "add_rms_norm"):
        real = getattr(rmsnorm, name)
        monkeypatch.setattr(rmsnorm, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    torch.manual_seed(0)
    model = tiny_llama().to(DEV)
    ref = GraphDecoder(model, max_len=12, attention="sdpa", norm="torch")
    ours = GraphDecoder(model, max_len=12, attention="sdpa", norm="fused")
    traced = GraphDecoder(model, max_len=12, attention="sdpa", norm="fused")
    step = traced.compile_step(backend="aot_eager")
    ids = torch.randint(0, 50, (1, 5), device=DEV)
    with torch.inference_mode():
        for dec in (ref, ours, traced):
            dec.prefill(ids)
        nxt = ids[:, -1:]
        for p in range(5, 8):
            pos = torch.tensor([p], device=DEV)
            a = ref.step(nxt, pos)
            n = len(calls)
            b = ours.step(nxt, pos)
            assert calls[n:] == ["rms_norm"] + ["add_rms_norm"] * 4, calls[n:]  # 2 layers
            c = step(nxt, pos)
            assert len(calls) == n + 5, "the traced step called the kernel"
            for got in (b, c):
                assert ((got - a).norm() / a.norm()).item() < 1e-5, p
            nxt = a.argmax(-1, keepdim=True)


def test_fused_norm_only_where_every_norm_fits(tiny_llama):
    torch.manual_seed(0)
    model = tiny_llama()
    assert default_norm(model, torch.device("cpu")) == "torch"  # the interpreter is for tests, not decoding
    assert default_norm(model, torch.device("cuda")) == "fused"
    assert GraphDecoder(model, max_len=8).norm == "torch"

    class OtherNorm(torch.nn.Module):  # a norm of different math (e.g. Gemma's 1 + weight)
        def __init__(self, n):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(n)), 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    model.model.layers[1].post_attention_layernorm = OtherNorm(64)
    assert default_norm(model, torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="norm 'fused' cannot compute this model's norms: OtherNorm"):
        GraphDecoder(model, max_len=8, norm="fused")
    with pytest.raises(ValueError, match="norm must be one of"):
        GraphDecoder(model, max_len=8, norm="layer")
