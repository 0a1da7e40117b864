"""The C++ CPU decode kernel against a float64 oracle on the same buffers: odd shapes, float32 and
bfloat16 storage, 1..8 rows, ranks 0 and r, sparsity 0..0.95, outputs poisoned with NaN."""
import pytest
import torch

from rsparse.kernels.cpu import CpuRSparseLinear, extension
from rsparse.linear import RSparseLinear, rsparse_linear_ref, svd_factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,IN,OUT,R,sparsity,bias", [
    (1, 300, 70, 0, 0.5, False), (1, 576, 192, 3, 0.95, True), (3, 513, 130, 0, 0.0, True),
    (8, 257, 65, 37, 0.7, False), (5, 1100, 96, 0, 0.4, True), (2, 129, 600, 9, 0.6, False), (1, 64, 1, 2, 0.3, True),
])
def test_cpu_kernel_matches_float64_oracle(dtype, B, IN, OUT, R, sparsity, bias):
    torch.manual_seed(B * 1000 + IN + OUT + R)
    ext = extension()
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN))
    wt = (torch.randn(IN, OUT) / IN**0.5).to(dtype)
    at, u = (torch.randn(IN, R) / 4).to(dtype), (torch.randn(OUT, R) / 4).to(dtype)
    c = torch.rand(IN) + 0.5
    scores = (x.abs() * c).reshape(-1).sort().values
    k = min(int(sparsity * len(scores)), len(scores) - 2)
    tau = float((scores[k] + scores[k + 1]) / 2) if sparsity > 0 else -1.0  # no score on the threshold
    b = torch.randn(OUT).to(dtype) if bias else None
    out = torch.full((B, OUT), float("nan"))
    ext.rsparse_gemv_cpu(x, wt.contiguous(), at.contiguous(), u.contiguous(), c, tau, b, out)
    ref = rsparse_linear_ref(x.double(), wt.double().T, None if b is None else b.double(), torch.tensor(tau), c.double(),
                             u.double(), at.double().T)
    assert torch.isfinite(out).all(), "output element left unwritten"
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_cpu_module_equals_rsparse_linear_and_falls_back_for_prefill():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 90)
    U, A = svd_factors(lin.weight.detach(), 4)
    ref_mod = RSparseLinear.from_linear(lin, 0.3, "wnorm", U.float(), A.float())
    fast = CpuRSparseLinear(ref_mod)
    with torch.no_grad():
        for shape in [(1, 200), (1, 1, 200), (4, 200), (2, 12, 200)]:
            x = torch.distributions.Laplace(0.0, 1.0).sample(shape)
            y, ref = fast(x), ref_mod(x)
            assert y.shape == ref.shape and ((y - ref).norm() / ref.norm()).item() < 1e-5
    assert fast.dense().weight.data_ptr() == fast.wt.data_ptr()  # prefill reads the same storage
