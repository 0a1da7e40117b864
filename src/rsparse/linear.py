"""RSparseLinear: a linear layer that computes large input channels exactly and the rest through
a low-rank factorisation of the same weight.

For an input row x (in features) and weight W (out x in):
    score_j = |x_j| * c_j                    (c_j = ||W[:, j]||_2 for score "wnorm", 1 for "abs")
    S       = {j : score_j > tau}             (kept channels, decided per token)
    y       = W[:, S] x_S + U (A x_notS) + b  (U: out x r, A = S_r V_r^T: r x in)
With r = 0 this is TEAL-style thresholding; with tau = -inf it is the dense layer, bit for bit.
`rsparse_linear_ref` is the eager oracle every fast backend (Triton, CPU) is tested against; the
module holds W in its original (out, in) layout so `dense()` can share the storage for prefill.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


SCORES = ("abs", "wnorm")  # the channel scores c_j: 1, or the weight column's norm


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def channel_scores(x: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """|x_j| c_j in at least float32 whatever the model dtype: the product of two bf16/fp16 values is
    exact in float32, so every backend (eager, Triton, C++) takes the same keep decisions against tau."""
    dt = _score_dtype(x)
    return x.to(dt).abs() * col_scale.to(dt)


def rsparse_linear_ref(x, weight, bias, tau, col_scale, U, A):
    """Eager reference. x: (..., in); returns (..., out) in x's dtype."""
    keep = channel_scores(x, col_scale) > tau.to(_score_dtype(x))
    y = F.linear(torch.where(keep, x, torch.zeros((), dtype=x.dtype)), weight, bias)
    if A.shape[0] > 0:
        y = y + F.linear(F.linear(torch.where(keep, torch.zeros((), dtype=x.dtype), x), A), U)
    return y


class RSparseLinear(nn.Module):
    """Sparse-plus-low-rank replacement of an nn.Linear for decoding (see module docstring)."""

    def __init__(self, weight: nn.Parameter, bias, tau: float, col_scale: torch.Tensor, U: torch.Tensor, A: torch.Tensor,
                 keep: float | None = None):
        super().__init__()
        out_f, in_f = weight.shape
        if U.shape != (out_f, A.shape[0]) or A.shape[1] != in_f or col_scale.shape != (in_f,):
            raise ValueError(f"factor shapes U{tuple(U.shape)} A{tuple(A.shape)} c{tuple(col_scale.shape)} do not fit W{tuple(weight.shape)}")
        if float(tau) != float(tau):  # -inf keeps every channel, +inf none; nan would keep none, unnoticed
            raise ValueError("tau is nan")
        self.in_features, self.out_features = in_f, out_f
        self.weight = weight  # shared with the dense layer it replaces, never copied
        self.bias = bias
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32, device=weight.device))
        self.register_buffer("col_scale", col_scale.to(weight.dtype))
        self.register_buffer("U", U.to(weight.dtype).contiguous())
        self.register_buffer("A", A.to(weight.dtype).contiguous())
        self.keep = keep  # expected fraction of channels a token keeps (the plan's calibration); None: unknown

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tau: float, score: str = "abs", U=None, A=None,
                    keep: float | None = None) -> "RSparseLinear":
        """Wrap `linear` with threshold `tau`; `U`, `A` are the rank-r factors (None: r = 0); `keep` the
        expected kept fraction (fast backends use it to decide which batch sizes sparsity pays at)."""
        W = getattr(linear, "weight", None)
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError(f"from_linear wraps a linear layer (a 2-d weight), got {type(linear).__name__}")
        if score not in SCORES:
            raise ValueError(f"score must be {' or '.join(map(repr, SCORES))}, got {score!r}")
        if (U is None) != (A is None):
            raise ValueError("U and A are the two rank-r factors: give both or neither")
        col_scale = torch.ones(W.shape[1], dtype=W.dtype, device=W.device) if score == "abs" else column_norms(W).to(W.dtype)
        if U is None:
            U, A = W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
        return cls(linear.weight, linear.bias, tau, col_scale, U, A, keep)

    def forward(self, x):
        return rsparse_linear_ref(x, self.weight, self.bias, self.tau, self.col_scale, self.U, self.A)

    def keep_mask(self, x):
        return channel_scores(x, self.col_scale) > self.tau.to(_score_dtype(x))

    def dense(self) -> nn.Linear:
        """The dense layer this module replaced, sharing its weight and bias storage."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        w = self.weight  # a backend may store W^T: the view is wrapped, never copied
        lin.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, tau={self.tau.item():.4g}"


MAX_DECODE_ROWS = 8  # inputs with more rows (prefill, all-token evaluation) run the oracle


class TransposedRSparseLinear(RSparseLinear):
    """Base of the fast backends: the same module, W stored as Wt = W^T (in, out) so a kept channel
    is one contiguous row, and A as At = A^T (in, r). Only Wt is stored: `weight` is its view, so
    `dense()` (prefill) reads the same storage. A subclass stores U in its kernel's layout (`U`
    property) and runs 1..MAX_DECODE_ROWS rows in `decode_rows(rows) -> (rows, out)`."""

    def __init__(self, m: RSparseLinear, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        dt = dtype or m.weight.dtype
        self.in_features, self.out_features = m.in_features, m.out_features
        self.wt = nn.Parameter(m.weight.detach().t().to(dt).contiguous(), requires_grad=False)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().to(dt).clone(), requires_grad=False)
        self.register_buffer("tau", m.tau.clone())
        self.register_buffer("col_scale", m.col_scale.clone())
        self.register_buffer("at", m.A.t().to(dt).contiguous())
        self.keep = m.keep

    @property
    def weight(self):
        return self.wt.t()

    @property
    def A(self):
        return self.at.t()

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def oracle(self, x):
        """The eager reference on this module's buffers, in x's dtype (prefill, all-token evaluation)."""
        return rsparse_linear_ref(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                                  self.tau, self.col_scale, self.U.to(x.dtype), self.A.to(x.dtype))

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_DECODE_ROWS:
            return self.oracle(x)
        return self.decode_rows(rows).to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class ThresholdedActivation(nn.Module):
    """CATS: act(g) with entries of magnitude <= tau set to zero (MLP only)."""

    def __init__(self, act: nn.Module, tau: float):
        super().__init__()
        self.act = act
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32))

    def forward(self, g):
        a = self.act(g)
        return torch.where(a.abs() > self.tau.to(a.dtype), a, torch.zeros((), dtype=a.dtype))

    def keep_mask(self, g):
        return self.act(g).abs() > self.tau.to(g.dtype)

    def dense(self) -> nn.Module:
        return self.act


def column_norms(W: torch.Tensor) -> torch.Tensor:
    return W.double().norm(dim=0).float()


def svd_basis(W: torch.Tensor, whiten: torch.Tensor | None = None):
    """Float64 (U, A) with W = U A (A = S V^T) from an SVD of W, or of W L for a whitening L
    (C = L L^T the second moment of the inputs the factors will see): then A = S V^T L^-1, and
    the first r columns of U / rows of A minimise E||W z - U_r A_r z||^2 over z ~ C instead of
    ||W - U_r A_r||_F. Truncating one basis gives the factors of every rank."""
    W64 = W.double()
    if whiten is None:
        u, s, vh = torch.linalg.svd(W64, full_matrices=False)
        return u, s[:, None] * vh
    L = whiten.double()
    u, s, vh = torch.linalg.svd(W64 @ L, full_matrices=False)
    return u, torch.linalg.solve_triangular(L, s[:, None] * vh, upper=False, left=False)


def svd_factors(W: torch.Tensor, rank: int, whiten: torch.Tensor | None = None):
    """Rank-r factors (U_r, A_r) of `svd_basis`."""
    u, a = svd_basis(W, whiten)
    return u[:, :rank].contiguous(), a[:rank].contiguous()
