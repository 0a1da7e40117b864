"""The r = 0 gather in CUDA C++ (`rsparse::cuda_partials`): a second backend for the compiled decode
step's `rsparse::rsparse_partials`, built with nvcc on first use (torch.utils.cpp_extension; cached).

Math and layout as `triton_gemv`: Wt = W^T (in, out) row-major, a kept input channel j (|x_j| c_j > tau
for any of the 1..8 rows, float32) is one contiguous row Wt[j, :], and each row multiplies only its own
kept entries. Output: float32 partials (in / (256 CHUNKS), rows, out) whose sum over the first axis
is the product; under torch.compile inductor sums them inside the consumer's kernel (`sum_partials`).

Why a second backend (docs/perf-gpu.md, session 33): the Triton gather compacts each chunk's kept
indices into a scratch row (cumsum, store, barrier) before its first weight load and then follows an
index -> row chain per K step. Here a warp loads x and c of 32 channels, one ballot gives the kept bits,
and it walks the set bits itself, 8 rows in flight, 16 bytes per lane (512 contiguous bytes per row
piece): no index list and no compaction pass. A block is 8 warps over one 256-column tile and
CHUNKS chunks of 256 channels (1: small enough that the hardware balances the grid). Lone calls on an H200 (bf16, batch 1, 50%,
`benchmarks/gpu_cuda_gather.py`): the gather alone 7-11% faster than the Triton gather on the MLP
shapes, 24% on 4096x4096, 8% slower on 1024x4096 (session 33); yet a compiled 50% step with it runs no
faster than with the Triton gather: 0.96x in session 34, 1.00x (1.02x with CHUNKS 4) in session 35, within
what one compile's autotuning picks move a step (session 33's +7.5% had a graph break per call). Group
members (q|k|v, gate|up side by side, `seg1`, `seg2`) must start on a 256-column tile; each tile
thresholds with its member's c and tau.
"""
from __future__ import annotations

import torch

TILE = 256  # output columns per block (one 16-byte piece per lane) and input channels per block chunk

# 256-channel chunks each block walks (read where the modules call the op, i.e. when a step is traced):
# the op writes in / (256 CHUNKS) partials for the consumer to sum. 1 is the configuration timed alone
# in session 33; with it the compiled step sums 4-8x as many partials as with the Triton gather (whose
# chunks are 1024-2048 channels). End to end (sessions 35-36) chunks 4 gained 2% (inside the spread) and
# chunks 8 lost 16%. The profile (session 36) shows the balance: chunks 1's gathers save 281 us a step and
# the consumers summing their partials pay 274 us back. Summing runs of block rows inside the kernel
# instead (the last-arriving block of each run, threadFenceReduction; commit 05e653b, removed in session 36)
# cut the consumers' share back but added ~2.6 us of serial tail a call: 1.00x / 0.95x the Triton step.
CHUNKS = 1
_EXT = None
_ERROR: str | None = None

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ float2 pair(uint32_t v, __nv_bfloat16) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v)); }
__device__ __forceinline__ float2 pair(uint32_t v, __half) { return __half22float2(*reinterpret_cast<__half2*>(&v)); }
__device__ __forceinline__ float one(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float one(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ void fma8(float* a, uint4 v, float s) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = pair(w[i], T());
    a[2 * i] = fmaf(f.x, s, a[2 * i]);
    a[2 * i + 1] = fmaf(f.y, s, a[2 * i + 1]);
  }
}

constexpr int NW = 8, U = 8, TW = 256;

// grid (out tiles, in / (256 kc)); block NW warps; in its chunk k < kc warp w owns channels
// (split * kc + k) * 256 + w * 32 + [0, 32); one partial per block: kc sets how many the consumer sums
template <typename T, int BM>
__global__ void __launch_bounds__(NW * 32)
gather(const T* __restrict__ x, const T* __restrict__ c, const float* __restrict__ tau, const T* __restrict__ wt,
       float* __restrict__ part, int B, int IN, int OUT, int ldw, int seg1, int seg2, int kc) {
  __shared__ float red[NW][TW];
  const int tile = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col0 = tile * TW, col = col0 + lane * 8;  // OUT % 8 == 0: a piece is all in or all out
  const int p = col0 >= seg2 ? 2 : col0 >= seg1 ? 1 : 0;  // the member of this tile
  const float t = tau[p];
  float acc[BM][8];
#pragma unroll
  for (int b = 0; b < BM; ++b)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[b][i] = 0.f;
  const bool vok = col < OUT;
  for (int k = 0; k < kc; ++k) {
    const int g = (split * kc + k) * TW + warp * 32, j = g + lane;
    float xv[BM];
    bool any = false;
    const float cj = j < IN ? one(c[(size_t)p * IN + j]) : 0.f;
#pragma unroll
    for (int b = 0; b < BM; ++b) {
      xv[b] = (b < B && j < IN) ? one(x[(size_t)b * IN + j]) : 0.f;
      const bool kept = b < B && j < IN && fabsf(xv[b]) * cj > t;  // (a padded lane's 0 > tau where tau < 0)
      if (!kept) xv[b] = 0.f;  // a row multiplies only its own kept entries of the union
      any |= kept;
    }
    unsigned mask = __ballot_sync(0xffffffffu, any);  // warp-uniform: every branch below is the whole warp's
    const T* wg = wt + (size_t)g * ldw + col;
    while (mask) {
      int s[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u] = mask ? __ffs(mask) - 1 : -1;
        mask &= mask - 1;
      }
      uint4 r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = (s[u] >= 0 && vok) ? ld_stream(wg + (size_t)s[u] * ldw) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int b = 0; b < BM; ++b) {
          const float xs = __shfl_sync(0xffffffffu, xv[b], s[u] & 31);
          if (s[u] >= 0) fma8<T>(acc[b], r[u], xs);
        }
      }
    }
  }
#pragma unroll
  for (int b = 0; b < BM; ++b) {  // fully unrolled, so acc stays in registers (B is the block's, uniform)
    if (b < B) {
      float4* dst = reinterpret_cast<float4*>(&red[warp][lane * 8]);
      dst[0] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
      dst[1] = make_float4(acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
    }
    __syncthreads();
    if (b < B) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) sum += red[w][threadIdx.x];
      if (col0 + (int)threadIdx.x < OUT) part[((size_t)split * B + b) * OUT + col0 + threadIdx.x] = sum;
    }
    __syncthreads();
  }
}

template <typename T>
static void launch_t(const torch::Tensor& x, const torch::Tensor& c, const torch::Tensor& tau, const torch::Tensor& wt,
                     torch::Tensor& part, int seg1, int seg2, int kc) {
  const int B = x.size(0), IN = wt.size(0), OUT = wt.size(1);
  const dim3 grid((OUT + TW - 1) / TW, part.size(0));  // one block row per partial
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* cp = reinterpret_cast<const T*>(c.data_ptr());
  const T* wp = reinterpret_cast<const T*>(wt.data_ptr());
  const float* tp = tau.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const int ldw = wt.stride(0);
#define RS_LAUNCH(BM) gather<T, BM><<<grid, NW * 32, 0, stream>>>(xp, cp, tp, wp, pp, B, IN, OUT, ldw, seg1, seg2, kc)
  if (B == 1) RS_LAUNCH(1);
  else if (B == 2) RS_LAUNCH(2);
  else if (B <= 4) RS_LAUNCH(4);
  else RS_LAUNCH(8);
#undef RS_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

torch::Tensor partials(torch::Tensor x, torch::Tensor wt, torch::Tensor c, torch::Tensor tau, int64_t seg1, int64_t seg2,
                       int64_t kc) {
  const int B = x.size(0), IN = wt.size(0), OUT = wt.size(1);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(wt.data_ptr()) % 16 == 0, "cuda_partials: wt must start 16-byte aligned");
  TORCH_CHECK(kc >= 1, "cuda_partials: chunks per block must be >= 1");
  auto part = torch::empty({(IN + TW * kc - 1) / (TW * kc), B, OUT}, x.options().dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kBFloat16) launch_t<__nv_bfloat16>(x, c, tau, wt, part, seg1, seg2, kc);
  else launch_t<__half>(x, c, tau, wt, part, seg1, seg2, kc);
  return part;
}
"""

_DECL = ("torch::Tensor partials(torch::Tensor x, torch::Tensor wt, torch::Tensor c, torch::Tensor tau, int64_t seg1, "
         "int64_t seg2, int64_t kc);")


def _ext():
    """The compiled extension (built on first use, for this GPU's architecture only)."""
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load_inline

        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
        _EXT = load_inline(name=f"rsparse_cuda_gather_sm{arch}", cpp_sources=_DECL, cuda_sources=_SOURCE,
                           functions=["partials"], extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"])
    return _EXT


def available() -> bool:
    """Whether the backend can run here: a CUDA GPU and nvcc (found by torch's CUDA_HOME). A failed
    build is remembered (`build_error`) and the answer is then False."""
    if _ERROR is not None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def build_error() -> str | None:
    return _ERROR


def ensure_built() -> bool:
    """Build now (outside any compile or graph capture); False, with the reason kept, if it fails."""
    global _ERROR
    if not available():
        return False
    try:
        _ext()
    except Exception as e:  # nvcc missing or failing: the Triton gather stays in use
        _ERROR = f"{type(e).__name__}: {str(e)[:300]}"
        return False
    return True


def require() -> None:
    """`ensure_built`, raising ValueError that names why the CUDA gather cannot run here."""
    if not ensure_built():
        raise ValueError("the CUDA gather cannot run here: " + (build_error() or "no CUDA GPU, or no nvcc (torch finds no CUDA_HOME)"))


# Batch sizes the modules hand this kernel (the op itself takes 1..8 rows). Each kept row costs a lane B
# shuffles and 8 B FMAs on the CUDA cores, where the Triton gather uses tl.dot. On an H200 at 50%
# (session 35, `gpu_kernels_s35.json`) the gather alone took 0.72-0.94x the Triton gather's time at
# batch 1, 0.79-1.19x at 2, 1.0-1.68x at 4 and 1.47-2.32x at 8; compiled Llama-3-8B-shaped 50% steps with
# it (4 chunks) ran 0.94x (batch 2) and 0.73x (batch 4) as fast as the Triton step (`gpu_decode_s35_kc4_b24.json`).
MAX_ROWS = 1


def fits(wt: torch.Tensor, rank: int, seg1: int, seg2: int, rows: int = 1) -> bool:
    """Calls the modules hand this kernel: r = 0, bf16/fp16, 16-byte aligned rows of a width divisible
    by 8, group members starting on 256-column tiles, at most MAX_ROWS rows of x. Shapes and strides only,
    so that it can be asked while torch.compile traces (dynamo breaks the graph at `storage_offset()`:
    session 33); the op itself checks the data pointer's alignment."""
    out = wt.shape[1]
    return (rank == 0 and rows <= MAX_ROWS and wt.dtype in (torch.bfloat16, torch.float16) and wt.is_cuda
            and wt.stride(1) == 1 and out % 8 == 0 and wt.stride(0) % 8 == 0
            and all(s % TILE == 0 for s in (seg1, seg2) if s < out))


@torch.library.custom_op("rsparse::cuda_partials", mutates_args=())
def cuda_partials(x: torch.Tensor, wt: torch.Tensor, col_scale: torch.Tensor, tau: torch.Tensor, seg1: int,
                  seg2: int, chunks: int = 1) -> torch.Tensor:
    """float32 partials (in / (256 chunks), rows, out) of the r = 0 sparse product of x (1..8 rows) with
    wt (in, out) (a group's: members at [0, seg1), [seg1, seg2), [seg2, out) with col_scale (P, in), tau
    (P,); one module: seg1 = seg2 = out, col_scale (in,), tau ()); chunks: 256-channel chunks per block."""
    IN = wt.shape[0]
    if chunks < 1:
        raise ValueError(f"cuda_partials: chunks (256-channel chunks per block) must be >= 1, got {chunks}")
    if not 1 <= x.shape[0] <= 8 or x.shape[1] != IN or x.dtype != wt.dtype:
        raise ValueError(f"cuda_partials: x must be 1..8 rows of {IN} {wt.dtype} values, got {tuple(x.shape)} {x.dtype}")
    if col_scale.dtype != wt.dtype:  # the kernel reads the scales in the weights' type (as the modules store them)
        raise ValueError(f"cuda_partials: col_scale must be {wt.dtype} like the weights, got {col_scale.dtype}")
    return _ext().partials(x.contiguous(), wt, col_scale.reshape(-1, IN).contiguous(), tau.reshape(-1).float().contiguous(),
                           seg1, seg2, chunks)


@cuda_partials.register_fake
def _(x, wt, col_scale, tau, seg1, seg2, chunks=1):
    return x.new_empty((n_partials(wt.shape[0], chunks), x.shape[0], wt.shape[1]), dtype=torch.float32)


def n_partials(in_features: int, chunks: int = 1) -> int:
    """Partials the op writes: one per block row of 256 * chunks input channels."""
    return -(-in_features // (TILE * chunks))
