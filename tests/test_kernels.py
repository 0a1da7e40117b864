"""Triton decode kernels against the eager oracle, on the CPU through Triton's interpreter
(TRITON_INTERPRET=1; on a GPU machine the same tests run on the device). Fresh random inputs,
odd shapes (not multiples of any block, GQA-like widths), batch 1..8, sparsity 0..0.95, and
outputs poisoned with NaN so an unwritten element fails."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from rsparse.kernels import triton_gemv as tg  # noqa: E402
from rsparse.linear import rsparse_linear_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _case(B, IN, OUT, R, sparsity, dtype, bias):
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN)).to(dtype)
    W = (torch.randn(OUT, IN) / IN**0.5).to(dtype)
    U, A = (torch.randn(OUT, R) / 4).to(dtype), (torch.randn(R, IN) / 4).to(dtype)
    c = (torch.rand(IN) + 0.5).to(dtype)
    # tau halfway between two neighbouring scores: no score sits on the threshold, where float32
    # (kernel) and float64 (oracle) products could fall on different sides
    scores = (x.double().abs() * c.double()).reshape(-1).sort().values
    k = min(int(sparsity * len(scores)), len(scores) - 2)
    tau = (scores[k] + scores[k + 1]) / 2 if sparsity > 0 else torch.tensor(-1.0)
    b = torch.randn(OUT).to(dtype) if bias else None
    return x, W, U, A, c, tau.float(), b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,IN,OUT,R,sparsity", [
    (1, 300, 70, 0, 0.5), (1, 576, 192, 3, 0.95), (3, 513, 130, 0, 0.0), (8, 257, 65, 37, 0.7),
    (5, 1100, 96, 0, 0.4), (2, 129, 200, 9, 0.6), (7, 64, 33, 64, 0.5),
])
@pytest.mark.parametrize("variant", ["fused", "select", "fma"])
def test_gemv_matches_oracle(dtype, B, IN, OUT, R, sparsity, variant):
    torch.manual_seed(hash((B, IN, OUT, R, variant)) % 2**31)
    x, W, U, A, c, tau, b = _case(B, IN, OUT, R, sparsity, dtype, bias=(B % 2 == 1))
    cfg = dict(tg.config_for(OUT, R), fused=variant == "fused", fma=variant == "fma", chunk=128 if IN < 600 else 256, block_n=64)
    out = torch.full((B, OUT), float("nan"), dtype=dtype)
    args = [t.to(DEV) if t is not None else None for t in (x, W.T.contiguous(), A.T.contiguous(), U, c, tau, b)]
    y = tg._launch(*args, cfg, out=out.to(DEV)).cpu()
    ref = rsparse_linear_ref(x.double(), W.double(), None if b is None else b.double(), tau.double(), c.double(), U.double(), A.double())
    assert torch.isfinite(y).all(), "output element left unwritten"
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


def test_registered_op_and_teal_baseline():
    torch.manual_seed(0)
    x, W, U, A, c, tau, b = _case(1, 333, 77, 5, 0.5, torch.float32, bias=True)
    dev = [t.to(DEV) for t in (x, W.T.contiguous(), A.T.contiguous(), U, c, tau, b)]
    y = torch.ops.rsparse.rsparse_gemv(*dev).cpu()
    ref = rsparse_linear_ref(x.double(), W.double(), b.double(), tau.double(), c.double(), U.double(), A.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    ones = torch.ones(333)
    yt = tg.teal_gemv(x[0].to(DEV), W.T.contiguous().to(DEV), tau.to(DEV), split_k=4, block_n=64).cpu()
    ref_t = rsparse_linear_ref(x.double(), W.double(), None, tau.double(), ones.double(), U[:, :0].double(), A[:0].double())[0]
    assert ((yt.double() - ref_t).norm() / ref_t.norm()).item() < 1e-5


def test_triton_module_matches_rsparse_linear():
    """TritonRSparseLinear (Wt layout, kernel for <= 8 rows, oracle beyond) equals RSparseLinear, and
    its dense twin shares the stored weight."""
    from rsparse.kernels.module import TritonRSparseLinear
    from rsparse.linear import RSparseLinear, svd_factors

    torch.manual_seed(1)
    lin = torch.nn.Linear(300, 70, bias=True)
    U, A = svd_factors(lin.weight.detach(), 5)
    ref_mod = RSparseLinear.from_linear(lin, 0.4, "wnorm", U.float(), A.float())
    fast = TritonRSparseLinear(ref_mod).to(DEV)
    for shape in [(1, 300), (3, 1, 300), (2, 9, 300)]:  # decode rows and a prefill-sized input
        x = torch.distributions.Laplace(0.0, 1.0).sample(shape)
        with torch.no_grad():
            y, ref = fast(x.to(DEV)).cpu(), ref_mod(x)
        assert y.shape == ref.shape
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    assert fast.dense().weight.data_ptr() == fast.wt.data_ptr()
