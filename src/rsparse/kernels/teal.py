"""TEAL-style baseline for one row (the public design of TEAL's kernel, written here): |x_j| > tau,
masked loads of Wt rows (Wt = W^T, (in, out), so a kept channel is one contiguous row), split-K over
the input channels with float32 atomic accumulation into y. Benchmarks measure ours against it on the
same inputs (benchmarks/gpu_kernels.py); it is not a decode path.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _teal_kernel(x_ptr, tau_ptr, wt_ptr, y_ptr, IN, OUT, K_PER,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tau = tl.load(tau_ptr)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * K_PER, tl.minimum((pid_k + 1) * K_PER, IN), BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + kk, mask=kk < IN, other=0.0).to(tl.float32)
        keep = (tl.abs(xv) > tau) & (kk < IN)
        w = tl.load(wt_ptr + kk[:, None].to(tl.int64) * OUT + n[None, :], mask=keep[:, None] & (n[None, :] < OUT), other=0.0)
        acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
    tl.atomic_add(y_ptr + n, acc, mask=n < OUT)


def teal_gemv(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor, split_k: int = 8, block_n: int = 128,
              block_k: int = 32, warps: int = 4, stages: int = 3) -> torch.Tensor:
    """TEAL-style baseline for one row: |x| > tau, masked row loads, split-K fp32 atomics."""
    IN, OUT = wt.shape
    y = torch.zeros(OUT, dtype=torch.float32, device=x.device)
    k_per = triton.cdiv(triton.cdiv(IN, split_k), block_k) * block_k
    _teal_kernel[(triton.cdiv(OUT, block_n), triton.cdiv(IN, k_per))](
        x, tau, wt, y, IN, OUT, k_per, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return y.to(x.dtype)
