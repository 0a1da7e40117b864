// An experiment, not a package kernel: the r = 0 sparse GEMV's gather written in CUDA C++, to learn
// whether the 85%-of-copy-bandwidth target is out of reach for the method or for Triton's programs.
//
// y = sum over kept j of x_j Wt[j, :], kept: |x_j| c_j > tau (float32, the oracle's rule); Wt (IN, OUT)
// row-major bf16, so a kept channel is one contiguous row. Batch 1 only.
//
// What differs from the Triton gather (src/rsparse/kernels/triton_gemv.py): no compaction pass and no
// index list. Each warp owns GPW groups of 32 channels; its lanes load x and c of a group, one ballot
// gives the kept bits, and the warp walks the set bits U at a time, each lane loading V 16-byte pieces
// of every kept row (a warp reads 512 contiguous bytes per row piece) into registers, then multiplying.
// A block (NW warps) owns one output tile of V * 256 columns and NW * GPW * 32 channels; its warps'
// sums meet in shared memory and it writes one float32 partial row. Blocks are small, so the hardware
// hands a free slot the next block: the grid balances itself without a work counter.
// `rs_reduce` sums the partials into y (bf16). Driven by benchmarks/gpu_cuda_gather.py.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ void fma8(float* a, uint4 v, float s) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    a[2 * i] = fmaf(f.x, s, a[2 * i]);
    a[2 * i + 1] = fmaf(f.y, s, a[2 * i + 1]);
  }
}

template <int NW, int V, int GPW, int U>
__global__ void __launch_bounds__(NW * 32)
rs_gather(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ c,
          const float* __restrict__ tau_p, const __nv_bfloat16* __restrict__ wt,
          float* __restrict__ part, int IN, int OUT, int ldw) {
  constexpr int TW = V * 256;
  constexpr int CH = NW * GPW * 32;
  extern __shared__ float red[];  // NW * TW floats (more may be requested, to cap blocks per SM)
  const int tile = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col = tile * TW + lane * 8;  // OUT % 8 == 0 (host checks): a piece is all in or all out
  const float tau = *tau_p;
  float acc[V][8];
  bool vok[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    vok[v] = col + v * 256 < OUT;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[v][i] = 0.f;
  }
  const __nv_bfloat16* wl = wt + col;
  const int kbase = split * CH + warp * GPW * 32;
  // every group's x, c and ballot first: one latency for all of them, not one per group
  float xv[GPW];
  unsigned m[GPW];
#pragma unroll
  for (int q = 0; q < GPW; ++q) {
    const int j = kbase + q * 32 + lane;
    bool keep = false;
    xv[q] = 0.f;
    if (j < IN) {
      xv[q] = __bfloat162float(x[j]);
      keep = fabsf(xv[q]) * __bfloat162float(c[j]) > tau;
    }
    m[q] = __ballot_sync(0xffffffffu, keep);
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int q = 0; q < GPW; ++q) {
    unsigned mask = m[q];  // warp-uniform: every branch below is taken by the whole warp
    const __nv_bfloat16* wg = wl + (size_t)(kbase + q * 32) * ldw;
    while (mask) {
      int b[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        b[u] = mask ? __ffs(mask) - 1 : -1;
        mask &= mask - 1;  // 0 stays 0
      }
      uint4 r[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int v = 0; v < V; ++v)
          r[u][v] = (b[u] >= 0 && vok[v]) ? ld_stream(wg + (size_t)b[u] * ldw + v * 256) : zero;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float s = __shfl_sync(0xffffffffu, xv[q], b[u] & 31);
        if (b[u] >= 0) {
#pragma unroll
          for (int v = 0; v < V; ++v) fma8(acc[v], r[u][v], s);
        }
      }
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    float4* dst = reinterpret_cast<float4*>(red + warp * TW + v * 256 + lane * 8);
    dst[0] = make_float4(acc[v][0], acc[v][1], acc[v][2], acc[v][3]);
    dst[1] = make_float4(acc[v][4], acc[v][5], acc[v][6], acc[v][7]);
  }
  __syncthreads();
  for (int t = threadIdx.x; t < TW; t += NW * 32) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) s += red[w * TW + t];
    const int cc = tile * TW + t;
    if (cc < OUT) part[(size_t)split * OUT + cc] = s;
  }
}

__global__ void rs_reduce(const float* __restrict__ part, __nv_bfloat16* __restrict__ y, int nsplit, int OUT) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= OUT) return;
  float s = 0.f;
  for (int k = 0; k < nsplit; ++k) s += part[(size_t)k * OUT + i];
  y[i] = __float2bfloat16(s);
}

// The plainest one-call read of n bytes: every thread streams 16-byte pieces (UNR in flight), the block
// sums them, one float per block. What any single kernel reading that many bytes can reach.
template <int UNR>
__global__ void __launch_bounds__(256) rs_read(const uint4* __restrict__ p, long long n16, float* __restrict__ out) {
  float s = 0.f;
  const long long stride = (long long)gridDim.x * 256;
  for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < n16; i += stride * UNR) {
    uint4 r[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) r[u] = i + u * stride < n16 ? ld_stream(p + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < UNR; ++u) s += __uint_as_float(r[u].x) + __uint_as_float(r[u].y) + __uint_as_float(r[u].z) + __uint_as_float(r[u].w);
  }
  __shared__ float red[256];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int k = 128; k > 0; k >>= 1) {
    if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = red[0];
}

#ifndef KERNELS_ONLY
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

template <int NW, int V, int GPW, int U>
static torch::Tensor launch(torch::Tensor x, torch::Tensor c, torch::Tensor tau, torch::Tensor wt, int64_t smem) {
  const int IN = wt.size(0), OUT = wt.size(1);
  constexpr int TW = V * 256, CH = NW * GPW * 32;
  const int ntile = (OUT + TW - 1) / TW, nsplit = (IN + CH - 1) / CH;
  auto part = torch::empty({nsplit, OUT}, x.options().dtype(torch::kFloat32));
  const int need = NW * TW * 4;
  const int bytes = smem > need ? (int)smem : need;
  auto kern = rs_gather<NW, V, GPW, U>;
  static int allowed = 48 * 1024;  // raised once, outside any graph capture (the first call checks the result)
  if (bytes > allowed) {
    TORCH_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess, "smem attribute");
    allowed = bytes;
  }
  kern<<<dim3(ntile, nsplit), NW * 32, bytes, at::cuda::getCurrentCUDAStream()>>>(
      (const __nv_bfloat16*)x.data_ptr(), (const __nv_bfloat16*)c.data_ptr(), tau.data_ptr<float>(),
      (const __nv_bfloat16*)wt.data_ptr(), part.data_ptr<float>(), IN, OUT, (int)wt.stride(0));
  return part;
}

// cfg picks (NW, V, GPW, U); smem: dynamic shared memory per block (to cap blocks per SM), 0 = what it needs
torch::Tensor gather(torch::Tensor x, torch::Tensor c, torch::Tensor tau, torch::Tensor wt, int64_t cfg, int64_t smem) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 1, "x: one bf16 row");
  TORCH_CHECK(wt.scalar_type() == torch::kBFloat16 && wt.stride(1) == 1 && wt.size(1) % 8 == 0 && wt.stride(0) % 8 == 0,
              "wt: bf16 (in, out), out and row stride multiples of 8");
  TORCH_CHECK(c.scalar_type() == torch::kBFloat16 && tau.scalar_type() == torch::kFloat32, "c bf16, tau float32");
  switch (cfg) {
    case 0: return launch<8, 2, 2, 8>(x, c, tau, wt, smem);
    case 1: return launch<4, 2, 1, 8>(x, c, tau, wt, smem);
    case 2: return launch<8, 1, 1, 8>(x, c, tau, wt, smem);
    case 3: return launch<4, 2, 2, 8>(x, c, tau, wt, smem);
    case 4: return launch<8, 2, 1, 8>(x, c, tau, wt, smem);
    case 5: return launch<4, 1, 2, 16>(x, c, tau, wt, smem);
    case 6: return launch<8, 2, 4, 8>(x, c, tau, wt, smem);
    case 7: return launch<4, 4, 1, 4>(x, c, tau, wt, smem);
    default: TORCH_CHECK(false, "cfg 0..7");
  }
  return torch::Tensor();
}

// blocks: grid size (blocks per SM x SMs); unr: 4 or 8 pieces in flight per thread
torch::Tensor read_bytes(torch::Tensor buf, int64_t blocks, int64_t unr) {
  TORCH_CHECK(buf.is_cuda() && buf.is_contiguous() && buf.nbytes() % 16 == 0, "buf: contiguous, a multiple of 16 bytes");
  auto out = torch::empty({blocks}, buf.options().dtype(torch::kFloat32));
  const long long n16 = buf.nbytes() / 16;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (unr == 8)
    rs_read<8><<<blocks, 256, 0, stream>>>((const uint4*)buf.data_ptr(), n16, out.data_ptr<float>());
  else
    rs_read<4><<<blocks, 256, 0, stream>>>((const uint4*)buf.data_ptr(), n16, out.data_ptr<float>());
  return out;
}

torch::Tensor reduce(torch::Tensor part) {
  const int nsplit = part.size(0), OUT = part.size(1);
  auto y = torch::empty({OUT}, part.options().dtype(torch::kBFloat16));
  rs_reduce<<<(OUT + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      part.data_ptr<float>(), (__nv_bfloat16*)y.data_ptr(), nsplit, OUT);
  return y;
}
#endif
