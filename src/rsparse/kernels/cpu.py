"""CPU decode backend for RSparseLinear: a small C++ kernel, compiled on first use with
torch.utils.cpp_extension (g++ and ninja; cached under the torch extensions directory).

Per input row x (1..8 rows of a decode step), with Wt = W^T stored (in, out) so that a kept
channel j is one contiguous row Wt[j, :], At = A^T (in, r) and Ut = U^T (r, out):
    S = {j : |x_j| c_j > tau},   z = sum_{j not in S} x_j At[j, :]
    y = sum_{j in S} x_j Wt[j, :]  +  sum_r z_r Ut[r, :]  +  b
so the low-rank term is r more "rows" with coefficients z. No gathered copy is made: each thread
streams a share of the kept rows, whole (long contiguous reads), into a private float32 partial
output, and the partials are summed. Projections that read the same input (q/k/v, gate/up) run as
one group: one call, one compaction pass, one parallel region (`CpuGroup`, attached per block for the
decoder). The kernel is called as the registered op `rsparse_cpu::group_run(rows, handle, outputs)`
(groups live in the extension by handle, freed with their module), so a torch.compile'd decode step
traces each call as one opaque op. Weights float32 or bfloat16 (converted to float32 in registers). More rows than
MAX_DECODE_ROWS (prefill, all-token evaluation) run the eager oracle on the same buffers.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn as nn

from ..errors import RSparseError
from ..linear import MAX_DECODE_ROWS, RSparseLinear, TransposedRSparseLinear

_EXT = None
# -fopenmp: at::parallel_for is inline; without it the "parallel" region runs on one thread.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <vector>
#include <memory>
#include <cmath>

template <typename T> static inline float to_f(T v) { return static_cast<float>(v); }

// d += sum_q x[q] * w[q][0:n] for 8 or 1 rows. Kept out of line with restrict pointers: inlined into
// the row loop, g++ vectorises across rows with gathers instead of along the row (measured 1.3x slower).
template <typename T>
__attribute__((noinline)) static void axpy8(float* __restrict d, const T* const* w, const float* __restrict x, int64_t n) {
  const T* __restrict w0 = w[0]; const T* __restrict w1 = w[1]; const T* __restrict w2 = w[2]; const T* __restrict w3 = w[3];
  const T* __restrict w4 = w[4]; const T* __restrict w5 = w[5]; const T* __restrict w6 = w[6]; const T* __restrict w7 = w[7];
  const float x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3], x4 = x[4], x5 = x[5], x6 = x[6], x7 = x[7];
  for (int64_t o = 0; o < n; ++o)
    d[o] += (x0 * to_f(w0[o]) + x1 * to_f(w1[o]) + x2 * to_f(w2[o]) + x3 * to_f(w3[o]))
          + (x4 * to_f(w4[o]) + x5 * to_f(w5[o]) + x6 * to_f(w6[o]) + x7 * to_f(w7[o]));
}
template <typename T>
__attribute__((noinline)) static void axpy1(float* __restrict d, const T* __restrict w, float x, int64_t n) {
  for (int64_t o = 0; o < n; ++o) d[o] += x * to_f(w[o]);
}

// d[0:OUT] += sum_k coef[k] * base[idx[k], 0:OUT]  (rows of a row-major (*, OUT) matrix)
template <typename T>
static void rows_axpy(float* d, const T* base, int64_t OUT, const int32_t* idx, const float* coef, int64_t n) {
  int64_t k = 0;
  const T* w[8];
  for (; k + 8 <= n; k += 8) {
    for (int q = 0; q < 8; ++q) w[q] = base + (int64_t)idx[k + q] * OUT;
    axpy8<T>(d, w, coef + k, OUT);
  }
  for (; k < n; ++k) axpy1<T>(d, base + (int64_t)idx[k] * OUT, coef[k], OUT);
}

// Projections that read the same input x (q/k/v, gate/up, or one alone), fixed at construction.
// Per input row: one serial pass compacts every member's kept channels and accumulates its
// low-rank input z = At[dropped]^T x; then one parallel region in which each of the T threads
// streams 1/T of every member's kept Wt rows (whole rows: long contiguous reads) and of its Ut rows
// (coefficient z_r) into a private partial output; the partials are summed at the end.
struct Group {
  std::vector<torch::Tensor> wt, at, ut, c, tau, bias;
  std::vector<int64_t> outf, rk, off;
  int64_t in = 0;
  bool bf16 = false;
  std::vector<std::vector<int32_t>> idx, drop;
  std::vector<std::vector<float>> coef;
  std::vector<int64_t> nk;
  std::vector<float> part;

  Group(std::vector<torch::Tensor> wt_, std::vector<torch::Tensor> at_, std::vector<torch::Tensor> ut_,
        std::vector<torch::Tensor> c_, std::vector<torch::Tensor> tau_, std::vector<torch::Tensor> bias_)
      : wt(wt_), at(at_), ut(ut_), c(c_), tau(tau_), bias(bias_) {
    const size_t P = wt.size();
    TORCH_CHECK(P > 0 && at.size() == P && ut.size() == P && c.size() == P && tau.size() == P && bias.size() == P, "group lists differ in length");
    in = wt[0].size(0);
    bf16 = wt[0].scalar_type() == torch::kBFloat16;
    off.push_back(0);
    for (size_t p = 0; p < P; ++p) {
      TORCH_CHECK(wt[p].scalar_type() == (bf16 ? torch::kBFloat16 : torch::kFloat32), "weights must be all float32 or all bfloat16");
      TORCH_CHECK(wt[p].dim() == 2 && wt[p].size(0) == in && wt[p].is_contiguous(), "Wt must be contiguous (in, out)");
      const int64_t o = wt[p].size(1), r = at[p].size(1);
      TORCH_CHECK(at[p].scalar_type() == wt[p].scalar_type() && at[p].is_contiguous() && at[p].size(0) == in, "At must be contiguous (in, r)");
      TORCH_CHECK(ut[p].scalar_type() == wt[p].scalar_type() && ut[p].is_contiguous() && ut[p].size(0) == r && ut[p].size(1) == o, "Ut must be contiguous (r, out)");
      TORCH_CHECK(c[p].scalar_type() == torch::kFloat32 && c[p].numel() == in, "col_scale must be float32 (in)");
      TORCH_CHECK(tau[p].scalar_type() == torch::kFloat32 && tau[p].numel() == 1, "tau must be a float32 scalar");
      TORCH_CHECK(bias[p].numel() == 0 || (bias[p].scalar_type() == wt[p].scalar_type() && bias[p].numel() == o), "bad bias");
      outf.push_back(o); rk.push_back(r); off.push_back(off.back() + o);
    }
    idx.resize(P); drop.resize(P); coef.resize(P); nk.resize(P);
  }

  template <typename T>
  void row(const float* xb, float* yb) {
    const int64_t P = wt.size();
    for (int64_t p = 0; p < P; ++p) {  // compaction and low-rank input, serial: O(in * (1 + r)) work
      const float* cp = c[p].data_ptr<float>();
      const float t = tau[p].data_ptr<float>()[0];
      const int64_t R = rk[p];
      const T* a = at[p].data_ptr<T>();
      auto& I = idx[p]; auto& C = coef[p];
      I.resize(in + R); C.resize(in + R);
      float* z = C.data() + in;  // scratch for z; moved behind the kept entries below
      for (int64_t r = 0; r < R; ++r) z[r] = 0.f;
      // branchless: which channels are kept is close to random, so a branch on it mispredicted on
      // about half of them (session 17: 1.00-1.10x the branching loop per round, median ~1.02x)
      auto& D = drop[p];  // the dropped channels, for the low-rank input
      D.resize(in);
      int64_t n = 0, m = 0;
      for (int64_t j = 0; j < in; ++j) {
        const float v = xb[j];
        const bool keep = std::fabs(v) * cp[j] > t;
        I[n] = (int32_t)j; C[n] = v; D[m] = (int32_t)j;
        n += keep; m += !keep;
      }
      if (R > 0)
        for (int64_t k = 0; k < m; ++k) {
          const float v = xb[D[k]];
          if (v != 0.f) axpy1<T>(z, a + (int64_t)D[k] * R, v, R);
        }
      for (int64_t r = 0; r < R; ++r) { C[n + r] = z[r]; I[n + r] = (int32_t)r; }
      nk[p] = n;
    }
    const int nt = std::max(1, at::get_num_threads());
    part.assign((size_t)(nt - 1) * off[P], 0.f);
    for (int64_t o = 0; o < off[P]; ++o) yb[o] = 0.f;
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* dst = t == 0 ? yb : part.data() + (t - 1) * off[P];
        for (int64_t p = 0; p < P; ++p) {
          const int64_t n = nk[p], R = rk[p], k0 = n * t / nt, k1 = n * (t + 1) / nt, r0 = R * t / nt, r1 = R * (t + 1) / nt;
          rows_axpy<T>(dst + off[p], wt[p].data_ptr<T>(), outf[p], idx[p].data() + k0, coef[p].data() + k0, k1 - k0);
          if (r1 > r0)
            rows_axpy<T>(dst + off[p], ut[p].data_ptr<T>(), outf[p], idx[p].data() + n + r0, coef[p].data() + n + r0, r1 - r0);
        }
      }
    });
    for (int t = 1; t < nt; ++t) {
      const float* s = part.data() + (t - 1) * off[P];
      for (int64_t o = 0; o < off[P]; ++o) yb[o] += s[o];
    }
    for (int64_t p = 0; p < P; ++p)
      if (bias[p].numel()) { const T* b = bias[p].data_ptr<T>(); for (int64_t o = 0; o < outf[p]; ++o) yb[off[p] + o] += to_f(b[o]); }
  }

  // x (B, in) any float dtype -> (B, sum of outs) float32, members side by side; not re-entrant
  torch::Tensor run(torch::Tensor x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "input rows must have ", in, " features");
    auto xf = x.to(torch::kFloat32).contiguous();
    auto y = torch::empty({xf.size(0), off.back()}, xf.options());
    for (int64_t b = 0; b < xf.size(0); ++b) {
      if (bf16) row<c10::BFloat16>(xf.data_ptr<float>() + b * in, y.data_ptr<float>() + b * off.back());
      else row<float>(xf.data_ptr<float>() + b * in, y.data_ptr<float>() + b * off.back());
    }
    return y;
  }
};

// Groups live here, by handle: the op below takes an int, so that torch.compile traces a call as one
// opaque op on x (its fake only needs the output width) and eager calls cost one dispatcher hop.
static std::vector<std::unique_ptr<Group>>& groups() { static std::vector<std::unique_ptr<Group>> g; return g; }

int64_t group_new(std::vector<torch::Tensor> wt, std::vector<torch::Tensor> at, std::vector<torch::Tensor> ut,
                  std::vector<torch::Tensor> c, std::vector<torch::Tensor> tau, std::vector<torch::Tensor> bias) {
  groups().push_back(std::make_unique<Group>(wt, at, ut, c, tau, bias));
  return (int64_t)groups().size() - 1;
}

void group_free(int64_t h) { if (h >= 0 && h < (int64_t)groups().size()) groups()[h].reset(); }

torch::Tensor group_run(torch::Tensor x, int64_t h, int64_t out_features) {
  TORCH_CHECK(h >= 0 && h < (int64_t)groups().size() && groups()[h], "rsparse CPU group ", h, " does not exist (freed?)");
  Group& g = *groups()[h];
  TORCH_CHECK(out_features == g.off.back(), "group ", h, " has ", g.off.back(), " outputs, not ", out_features);
  return g.run(x);
}

TORCH_LIBRARY(rsparse_cpu, m) {
  m.def("group_run(Tensor x, int handle, int out_features) -> Tensor");
  m.impl("group_run", torch::kCPU, &group_run);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_new", &group_new);
  m.def("group_free", &group_free);
}
"""


def extension():
    """The compiled kernel (built once per machine and torch version, then loaded from cache)."""
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load_inline

        try:
            # GOMP symbols resolve to the libgomp torch already loaded, so there is one thread pool.
            _EXT = load_inline(name="rsparse_cpu_v3", cpp_sources=[_SOURCE], functions=None, extra_cflags=CFLAGS,
                               verbose=os.environ.get("RSPARSE_VERBOSE_BUILD") == "1")
        except Exception as e:  # no compiler / ninja: say so in one line
            raise RSparseError(f"the CPU kernel could not be built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                               "it needs g++ and ninja (pip install ninja)") from None
        torch.library.register_fake("rsparse_cpu::group_run")(_group_run_fake)
    return _EXT


def _group_run_fake(x, handle, out_features):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


def _group(owner: nn.Module, members) -> int:
    """A C++ group over CpuRSparseLinear members (sharing their storage), freed with `owner`; returns
    its handle for `torch.ops.rsparse_cpu.group_run(rows, handle, total outputs)` -> float32."""
    empty = torch.empty(0)
    ext = extension()
    h = ext.group_new([m.wt for m in members], [m.at for m in members], [m.ut for m in members],
                      [m.col_scale for m in members], [m.tau for m in members],
                      [empty if m.bias is None else m.bias for m in members])
    weakref.finalize(owner, ext.group_free, h)
    return h


class CpuRSparseLinear(TransposedRSparseLinear):
    """RSparseLinear whose decode rows (1..8) run the C++ kernel; stores Wt, At and Ut = U^T (r, out)."""

    def __init__(self, m: RSparseLinear, dtype: torch.dtype | None = None):
        dt = dtype or m.weight.dtype
        if dt not in (torch.float32, torch.bfloat16):
            raise RSparseError(f"the CPU backend stores float32 or bfloat16 weights, not {dt} "
                               "(load the model in one of those, or keep the eager oracle modules)")
        super().__init__(m, dt)
        self.col_scale = self.col_scale.float()  # the kernel reads float32 scales (tau is float32 already)
        self.register_buffer("ut", m.U.t().to(dt).contiguous())
        self._handle = _group(self, [self])

    @property
    def U(self):
        return self.ut.t()

    def decode_rows(self, rows):
        return torch.ops.rsparse_cpu.group_run(rows, self._handle, self.out_features)


class CpuGroup(nn.Module):
    """q/k/v (or gate/up): members that read the same input, run in one kernel call (one compaction
    pass, one parallel region); returns the members' outputs. Holds no weights of its own."""

    def __init__(self, members: list):
        super().__init__()
        self._members = tuple(members)  # a plain tuple: the weights stay registered where they live
        self._handle = _group(self, members)
        self._split = [m.out_features for m in members]

    def forward(self, x):
        rows = x.reshape(-1, self._members[0].in_features)
        if rows.shape[0] > MAX_DECODE_ROWS:
            return tuple(m(x) for m in self._members)
        y = torch.ops.rsparse_cpu.group_run(rows, self._handle, sum(self._split)).to(x.dtype)
        return tuple(t.reshape(*x.shape[:-1], t.shape[-1]) for t in y.split(self._split, dim=-1))


def to_cpu_backend_(model, dtype: torch.dtype | None = None, fuse: bool = True) -> dict:
    """Swap every RSparseLinear of `model` for the C++ backend in place and, with `fuse`, attach one
    CpuGroup per block for q/k/v and gate/up when all members are sparse; returns {key: module}."""
    from ..apply import backend_candidates
    from ..families import group_members, set_group, set_module

    out = {}
    for key, m in backend_candidates(model, "to_cpu_backend_").items():
        if type(m) is RSparseLinear:
            out[key] = CpuRSparseLinear(m, dtype)
            set_module(model, key, out[key])
    if fuse:
        for (i, name), mods in group_members(model, out).items():
            set_group(model, i, name, CpuGroup(mods))
    return out
