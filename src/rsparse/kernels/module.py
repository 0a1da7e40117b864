"""TritonRSparseLinear: RSparseLinear with the decode step on the Triton kernels.

Layout (`TransposedRSparseLinear`): Wt = W^T (in, out) so a kept input channel is one contiguous
row, At = A^T (in, r) so a dropped channel reads r contiguous values, and here U (out, r). Only Wt
is stored, so prefill (`dense()`, used by `dense_view`) runs a dense cuBLAS matmul on the same
storage. Inputs of 1..8 rows (decode) go to `rsparse::rsparse_gemv`; more rows (all-tokens
evaluation) run the eager oracle on the same buffers.
"""
from __future__ import annotations

import torch

from ..linear import RSparseLinear, TransposedRSparseLinear
from . import triton_gemv  # noqa: F401  (registers torch.ops.rsparse.rsparse_gemv)


class TritonRSparseLinear(TransposedRSparseLinear):
    def __init__(self, m: RSparseLinear):
        super().__init__(m)
        self.register_buffer("U", m.U.clone())

    def decode_rows(self, rows):
        return torch.ops.rsparse.rsparse_gemv(rows, self.wt, self.at, self.U, self.col_scale, self.tau, self.bias)


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
