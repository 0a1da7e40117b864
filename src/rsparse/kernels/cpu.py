"""CPU decode backend for RSparseLinear: a small C++ kernel, compiled on first use with
torch.utils.cpp_extension (g++ and ninja; cached under the torch extensions directory).

Per input row x (1..8 rows of a decode step), with Wt = W^T stored (in, out) so that a kept
channel j is one contiguous row Wt[j, :]:
    S = {j : |x_j| c_j > tau}
    y = sum_{j in S} x_j Wt[j, :]  +  U (sum_{j not in S} x_j At[j, :])  +  b
No gathered copy of the kept rows is made: each thread owns a slice of output columns and streams
the kept rows' slices from memory once (the bytes read are what the budget counts), accumulating
in float32; At = A^T (in, r) makes a dropped channel r contiguous values. Weights may be stored in
float32 or bfloat16 (converted to float32 in registers). More rows than MAX_ROWS (prefill, all-token
evaluation) run the eager oracle on the same buffers.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..errors import RSparseError
from ..linear import RSparseLinear, rsparse_linear_ref

MAX_ROWS = 8
_EXT = None

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <vector>
#include <cmath>

template <typename T> static inline float to_f(T v) { return static_cast<float>(v); }

// y[b, o] for rows b < B; Wt (in, out), At (in, r), U (out, r); x float32 (B, in)
template <typename T>
static void run(const float* x, const float* c, float tau, const T* wt, const T* at, const T* u, const T* bias,
                float* y, int64_t B, int64_t IN, int64_t OUT, int64_t R) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * IN;
    std::vector<int64_t> kept; kept.reserve(IN);
    std::vector<float> z(R, 0.f);
    for (int64_t j = 0; j < IN; ++j) {
      if (std::fabs(xb[j]) * c[j] > tau) kept.push_back(j);
      else if (R > 0 && xb[j] != 0.f) {
        const T* a = at + j * R;
        for (int64_t r = 0; r < R; ++r) z[r] += xb[j] * to_f(a[r]);
      }
    }
    float* yb = y + b * OUT;
    const int64_t nk = (int64_t)kept.size();
    // each task owns a slice of output columns: a kept row is read once, in slices, by all tasks
    at::parallel_for(0, OUT, 256, [&](int64_t o0, int64_t o1) {
      const int64_t W = o1 - o0;
      std::vector<float> acc(W, 0.f);
      float* ac = acc.data();
      int64_t k = 0;
      for (; k + 4 <= nk; k += 4) {  // four rows per pass: fewer passes over the accumulator
        const int64_t j0 = kept[k], j1 = kept[k + 1], j2 = kept[k + 2], j3 = kept[k + 3];
        const float x0 = xb[j0], x1 = xb[j1], x2 = xb[j2], x3 = xb[j3];
        const T* w0 = wt + j0 * OUT + o0; const T* w1 = wt + j1 * OUT + o0;
        const T* w2 = wt + j2 * OUT + o0; const T* w3 = wt + j3 * OUT + o0;
        #pragma omp simd
        for (int64_t o = 0; o < W; ++o)
          ac[o] += x0 * to_f(w0[o]) + x1 * to_f(w1[o]) + x2 * to_f(w2[o]) + x3 * to_f(w3[o]);
      }
      for (; k < nk; ++k) {
        const float xj = xb[kept[k]];
        const T* w = wt + kept[k] * OUT + o0;
        #pragma omp simd
        for (int64_t o = 0; o < W; ++o) ac[o] += xj * to_f(w[o]);
      }
      for (int64_t o = 0; o < W; ++o) {
        float v = ac[o];
        if (R > 0) { const T* uo = u + (o0 + o) * R; for (int64_t r = 0; r < R; ++r) v += to_f(uo[r]) * z[r]; }
        if (bias) v += to_f(bias[o0 + o]);
        yb[o0 + o] = v;
      }
    });
  }
}

// writes every element of out (float32, B x OUT)
void rsparse_gemv_cpu(torch::Tensor x, torch::Tensor wt, torch::Tensor at, torch::Tensor u,
                      torch::Tensor c, double tau, c10::optional<torch::Tensor> bias, torch::Tensor out) {
  auto xf = x.to(torch::kFloat32).contiguous();
  auto cf = c.to(torch::kFloat32).contiguous();
  const int64_t B = xf.size(0), IN = xf.size(1), OUT = wt.size(1), R = at.size(1);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.size(0) == B && out.size(1) == OUT, "bad out");
  TORCH_CHECK(wt.is_contiguous() && at.is_contiguous() && u.is_contiguous(), "weights must be contiguous");
  if (wt.scalar_type() == torch::kBFloat16) {
    using T = c10::BFloat16;
    run<T>(xf.data_ptr<float>(), cf.data_ptr<float>(), (float)tau, wt.data_ptr<T>(), at.data_ptr<T>(), u.data_ptr<T>(),
           bias.has_value() ? bias->data_ptr<T>() : nullptr, out.data_ptr<float>(), B, IN, OUT, R);
  } else {
    TORCH_CHECK(wt.scalar_type() == torch::kFloat32, "weights must be float32 or bfloat16");
    run<float>(xf.data_ptr<float>(), cf.data_ptr<float>(), (float)tau, wt.data_ptr<float>(), at.data_ptr<float>(),
               u.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), B, IN, OUT, R);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rsparse_gemv_cpu", &rsparse_gemv_cpu); }
"""


def extension():
    """The compiled kernel (built once per machine and torch version, then loaded from cache)."""
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load_inline

        try:
            _EXT = load_inline(name="rsparse_cpu_v1", cpp_sources=[_SOURCE], functions=None,
                               extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-ffast-math"],
                               verbose=os.environ.get("RSPARSE_VERBOSE_BUILD") == "1")
        except Exception as e:  # no compiler / ninja: say so in one line
            raise RSparseError(f"the CPU kernel could not be built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                               "it needs g++ and ninja (pip install ninja)") from None
    return _EXT


class CpuRSparseLinear(RSparseLinear):
    """RSparseLinear whose decode rows run the C++ kernel; stores only Wt (and At, U)."""

    def __init__(self, m: RSparseLinear, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        dt = dtype or m.weight.dtype
        if dt not in (torch.float32, torch.bfloat16):
            raise RSparseError(f"the CPU backend stores float32 or bfloat16 weights, not {dt}")
        self.in_features, self.out_features = m.in_features, m.out_features
        self.wt = nn.Parameter(m.weight.detach().t().to(dt).contiguous(), requires_grad=False)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().to(dt), requires_grad=False)
        self.register_buffer("tau", m.tau.clone())
        self.register_buffer("col_scale", m.col_scale.float().clone())
        self.register_buffer("U", m.U.to(dt).contiguous())
        self.register_buffer("at", m.A.t().to(dt).contiguous())
        extension()

    @property
    def weight(self):
        return self.wt.t()

    @property
    def A(self):
        return self.at.t()

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_ROWS:
            return rsparse_linear_ref(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                                      self.tau, self.col_scale, self.U.to(x.dtype), self.A.to(x.dtype))
        y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        _EXT.rsparse_gemv_cpu(rows, self.wt, self.at, self.U, self.col_scale, float(self.tau), self.bias, y)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def to_cpu_backend_(model, dtype: torch.dtype | None = None) -> dict:
    """Swap every RSparseLinear of `model` for the C++ backend in place; returns {key: module}."""
    from ..apply import sparse_modules
    from ..families import set_module

    out = {}
    for key, m in sparse_modules(model).items():
        if type(m) is RSparseLinear:
            out[key] = CpuRSparseLinear(m, dtype)
            set_module(model, key, out[key])
    return out
