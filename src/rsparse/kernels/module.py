"""TritonRSparseLinear: RSparseLinear with the decode step on the Triton kernels.

Layout: Wt = W^T (in, out) so a kept input channel is one contiguous row, At = A^T (in, r) so a
dropped channel reads r contiguous values, U (out, r). Only Wt is stored: `weight` is the view
Wt^T, so prefill (`dense()`, used by `dense_view`) runs a dense cuBLAS matmul on the same storage
and no second copy of W exists. Inputs of 1..8 rows (decode) go to `rsparse::rsparse_gemv`; more
rows (all-tokens evaluation) run the eager oracle on the same buffers, so the module means the same
thing as RSparseLinear for every input.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..linear import RSparseLinear, rsparse_linear_ref
from . import triton_gemv  # noqa: F401  (registers torch.ops.rsparse.rsparse_gemv)

MAX_ROWS = 8


class TritonRSparseLinear(RSparseLinear):
    def __init__(self, m: RSparseLinear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = m.in_features, m.out_features
        self.wt = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        self.register_buffer("tau", m.tau.clone())
        self.register_buffer("col_scale", m.col_scale.clone())
        self.register_buffer("U", m.U.clone())
        self.register_buffer("at", m.A.t().contiguous())

    @property
    def weight(self):
        return self.wt.t()

    @property
    def A(self):
        return self.at.t()

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_ROWS:
            return rsparse_linear_ref(x, self.weight, self.bias, self.tau, self.col_scale, self.U, self.A)
        y = torch.ops.rsparse.rsparse_gemv(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def to_triton_(model) -> dict:
    """Swap every RSparseLinear of `model` for its Triton twin in place; returns {key: module}."""
    from ..apply import sparse_modules
    from ..families import set_module

    out = {}
    for key, m in sparse_modules(model).items():
        if type(m) is RSparseLinear:
            out[key] = TritonRSparseLinear(m)
            set_module(model, key, out[key])
    return out
