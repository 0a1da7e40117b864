"""RSparseLinear against hand-computed float64 references."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsparse.linear import RSparseLinear, ThresholdedActivation, column_norms, rsparse_linear_ref, svd_factors


def _loop_reference(x, W, b, tau, c, U, A):
    """Token by token, channel by channel, in float64: the definition of the method."""
    x, W, U, A = x.double(), W.double(), U.double(), A.double()
    out = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        low = torch.zeros(A.shape[0], dtype=torch.float64)
        for j in range(x.shape[1]):
            if abs(x[t, j]) * c[j] > tau:
                out[t] += W[:, j] * x[t, j]
            else:
                low += A[:, j] * x[t, j]
        out[t] += U @ low + (b.double() if b is not None else 0)
    return out


@pytest.mark.parametrize("shape,rank,score", [((13, 7), 3, "abs"), ((5, 11), 2, "wnorm"), ((192, 67), 0, "abs")])
def test_matches_loop_reference(shape, rank, score):
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, bias=True).double()
    x = torch.randn(6, in_f, dtype=torch.float64)
    U, A = svd_factors(lin.weight, rank) if rank else (None, None)
    tau = float(x.abs().median()) * (1.0 if score == "abs" else float(column_norms(lin.weight.detach()).median()))
    tau = float(torch.tensor(tau, dtype=torch.float32))  # the module stores tau in float32
    mod = RSparseLinear.from_linear(lin, tau, score, U, A)
    c = column_norms(lin.weight).double() if score == "wnorm" else torch.ones(in_f, dtype=torch.float64)
    ref = _loop_reference(x, lin.weight, lin.bias, tau, c, mod.U, mod.A)
    torch.testing.assert_close(mod(x), ref, rtol=1e-10, atol=1e-10)
    kept = mod.keep_mask(x).double().mean()
    assert 0.0 < kept < 1.0  # the case really mixes kept and dropped channels


def test_full_rank_no_kept_channels_equals_dense():
    lin = nn.Linear(24, 40, bias=False).double()
    U, A = svd_factors(lin.weight, 24)
    mod = RSparseLinear.from_linear(lin, float("inf"), "abs", U, A)
    x = torch.randn(5, 24, dtype=torch.float64)
    assert not mod.keep_mask(x).any()
    torch.testing.assert_close(mod(x), lin(x), rtol=1e-12, atol=1e-12)


def test_all_channels_kept_is_bitwise_dense():
    lin = nn.Linear(33, 17)
    mod = RSparseLinear.from_linear(lin, float("-inf"), "abs")
    x = torch.randn(3, 9, 33)
    assert torch.equal(mod(x), lin(x))
    dense = mod.dense()
    assert dense.weight.data_ptr() == lin.weight.data_ptr() and torch.equal(dense(x), lin(x))


def test_aware_factors_beat_plain_on_their_own_distribution():
    torch.manual_seed(1)
    W = torch.randn(30, 20, dtype=torch.float64)
    mix = torch.randn(20, 20, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    Z = torch.randn(4000, 20, dtype=torch.float64) @ mix  # strongly anisotropic inputs
    L = torch.linalg.cholesky(Z.T @ Z / len(Z))
    for r in (1, 4, 8):
        err = {}
        for name, wh in (("plain", None), ("aware", L)):
            U, A = svd_factors(W, r, wh)
            err[name] = (Z @ (W - U @ A).T).pow(2).sum().item()
        assert err["aware"] < err["plain"]
    U, A = svd_factors(W, 20, L)  # full rank: exact
    torch.testing.assert_close(U @ A, W, rtol=1e-8, atol=1e-8)


def test_bad_arguments_rejected_by_name():
    lin = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="do not fit"):
        RSparseLinear.from_linear(lin, 0.1, "abs", torch.zeros(6, 2), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="give both or neither"):
        RSparseLinear.from_linear(lin, 0.1, "abs", torch.zeros(6, 2), None)
    with pytest.raises(ValueError, match="score must be 'abs' or 'wnorm', got 'l2'"):
        RSparseLinear.from_linear(lin, 0.1, "l2")
    with pytest.raises(ValueError, match="tau is nan"):
        RSparseLinear.from_linear(lin, float("nan"))
    with pytest.raises(ValueError, match="a 2-d weight\\), got Conv1d"):
        RSparseLinear.from_linear(nn.Conv1d(8, 6, 1), 0.1)
    # the infinite thresholds are the two ends, not errors: every channel kept / none kept (rank 0: zero but bias)
    x = torch.randn(3, 8)
    assert torch.equal(RSparseLinear.from_linear(lin, -math.inf)(x), lin(x))
    assert torch.equal(RSparseLinear.from_linear(lin, math.inf)(x), lin.bias.detach().expand(3, 6))


def test_thresholded_activation():
    act = ThresholdedActivation(nn.SiLU(), 0.2)
    g = torch.randn(4, 50)
    a = F.silu(g)
    assert torch.equal(act(g), torch.where(a.abs() > 0.2, a, 0.0))
    assert isinstance(act.dense(), nn.SiLU)


def test_reference_function_is_the_module_forward():
    lin = nn.Linear(16, 12)
    U, A = svd_factors(lin.weight, 3)
    mod = RSparseLinear.from_linear(lin, 0.3, "abs", U.float(), A.float())
    x = torch.randn(2, 16)
    assert torch.equal(mod(x), rsparse_linear_ref(x, lin.weight, lin.bias, mod.tau, mod.col_scale, mod.U, mod.A))
