"""The pooled gather (`kernels/pool.py`) against the float64 oracle, through Triton's interpreter on the
CPU (on a GPU machine, on the device): fresh random inputs, odd shapes, batch 1..8, sparsity 0..0.95,
groups of members with their own thresholds, partials poisoned with NaN so an unwritten one fails, and
the counter left at zero for the next call."""
import pytest
import torch

pytest.importorskip("triton")

from rsparse.kernels.pool import pooled_partials  # noqa: E402
from rsparse.linear import rsparse_linear_ref  # noqa: E402
from thresholds import tau_between  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,IN,widths,sparsity,chunk,pool,block_n", [
    (1, 300, (70,), 0.5, 128, 32, 64),
    (8, 513, (130,), 0.7, 256, 64, 64),
    (3, 1100, (96,), 0.0, 256, 128, 32),
    (2, 129, (200,), 0.95, 128, 64, 64),
    (5, 257, (64, 32, 32), 0.6, 128, 16, 32),  # a q|k|v-like group: one threshold and scale per member
    (1, 700, (96, 96), 0.4, 512, 256, 32),  # gate|up-like; pool = half the chunk
])
def test_pooled_partials_sum_to_the_oracle(dtype, B, IN, widths, sparsity, chunk, pool, block_n):
    torch.manual_seed(hash((B, IN, widths, chunk, pool, str(dtype))) % 2**31)
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN)).to(dtype)
    Ws = [(torch.randn(o, IN) / IN**0.5).to(dtype) for o in widths]
    cs = [(torch.rand(IN) + 0.5).to(dtype) for _ in widths]
    taus = [tau_between(x.double().abs() * c.double(), sparsity).float() for c in cs]
    wt = torch.cat([W.T for W in Ws], 1).contiguous()
    bounds = [sum(widths[: i + 1]) for i in range(len(widths))] + [sum(widths)] * (3 - len(widths))
    cfg = dict(chunk=chunk, block_k=32, block_n=block_n, warps=4, stages=2)
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    nchunk = -(-IN // chunk)
    ypart = torch.full((2 * nchunk, B, wt.shape[1]), float("nan"), device=DEV)
    args = (x.to(DEV), wt.to(DEV), torch.stack(cs).to(DEV), torch.stack(taus).to(DEV))
    for call in range(2):  # the second call finds the counter the first one left
        ypart.fill_(float("nan"))
        out = pooled_partials(*args, cfg, pool, counter, bounds[0], bounds[1], ypart=ypart)
        assert counter.item() == 0, f"call {call} left the counter at {counter.item()}"
        assert not out.isnan().any(), "a partial was not written"
        y = out.sum(0).double().cpu()
        ref = torch.cat([rsparse_linear_ref(x.double(), W.double(), None, t.double(), c.double(),
                                            torch.zeros(W.shape[0], 0, dtype=torch.float64), torch.zeros(0, IN, dtype=torch.float64))
                         for W, c, t in zip(Ws, cs, taus)], 1)
        tol = 1e-5 if dtype == torch.float32 else 2e-3  # the oracle multiplies the rounded inputs in float64
        assert ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item() < tol


def test_pooled_partials_refuse_a_bad_pool_or_counter():
    x, wt = torch.randn(1, 64, device=DEV), torch.randn(64, 32, device=DEV)
    c, tau = torch.ones(64, device=DEV), torch.tensor(0.5, device=DEV)
    cfg = dict(chunk=64, block_k=32, block_n=32, warps=4, stages=2)
    ok = torch.zeros(1, dtype=torch.int32, device=DEV)
    for pool in (0, 48, 64):
        with pytest.raises(ValueError, match="pool must be a power of 2 below the chunk"):
            pooled_partials(x, wt, c, tau, cfg, pool, ok)
    with pytest.raises(ValueError, match="counter must be an int32 tensor"):
        pooled_partials(x, wt, c, tau, cfg, 16, torch.zeros(1, device=DEV))
