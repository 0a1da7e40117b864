"""Residual add + RMSNorm in one launch, for the graphed eager decode step (`decode.GraphDecoder`).

    s = h + d  (rounded to h's dtype, as PyTorch's add)
    y = w * round(s * rsqrt(mean(s^2) + eps))  (float32 inside, each product rounded once to the
        dtype: Hugging Face's LlamaRMSNorm, `weight * hidden.to(input_dtype)`)

Why: eager, LlamaRMSNorm is ~8 elementwise and reduction launches (casts, pow, mean, add, rsqrt, two
muls) and the residual add one more; a decode step has 2 per layer + 1, so on Llama-3-8B shapes ~590
of the graphed eager 50% step's 885 launches (session 23 profile). Compiled, inductor fuses the same
expression into one kernel together with its neighbours (the partials' sum), so the decoder keeps the
PyTorch expression there (`decode.add_rms_norm`).

Layout: rows (..., N) with the last dim contiguous, one program per row, N up to 16384 in one block
(hidden sizes of Llama-family models); weight (N,) in the rows' dtype.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(h_ptr, d_ptr, w_ptr, s_ptr, y_ptr, N, shr, sdr, ssr, syr, EPS: tl.constexpr, HAS_D: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK)
    m = n < N
    s = tl.load(h_ptr + row * shr + n, mask=m, other=0.0)
    if HAS_D:
        s = (s.to(tl.float32) + tl.load(d_ptr + row * sdr + n, mask=m, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * ssr + n, s, mask=m)
    x = s.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + EPS)
    t = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + n, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * syr + n, (w * t).to(y_ptr.dtype.element_ty), mask=m)


MAX_WIDTH = 16384


def _check(h, weight, d=None):
    N = h.shape[-1]
    if weight.shape != (N,) or weight.dtype != h.dtype or h.stride(-1) != 1 or weight.stride(0) != 1 or N > MAX_WIDTH:
        raise ValueError(f"rms norm needs rows (..., N <= {MAX_WIDTH}) with the last dim contiguous and a weight (N,) of "
                         f"their dtype, got rows {tuple(h.shape)} {h.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    if d is not None and (d.shape != h.shape or d.dtype != h.dtype or d.stride(-1) != 1):
        raise ValueError(f"the residual branch must match the rows, got {tuple(d.shape)} {d.dtype} for {tuple(h.shape)} {h.dtype}")


def _launch(h, d, weight, eps):
    N = h.shape[-1]
    h2 = h.reshape(-1, N)
    d2 = d.reshape(-1, N) if d is not None else h2
    s = torch.empty_like(h2) if d is not None else h2
    y = torch.empty_like(h2)
    torch.library.wrap_triton(_add_rms_norm)[(h2.shape[0],)](
        h2, d2, weight, s, y, N, h2.stride(0), d2.stride(0), s.stride(0), y.stride(0),
        EPS=float(eps), HAS_D=d is not None, BLOCK=triton.next_power_of_2(N), num_warps=4 if N <= 4096 else 8)
    return s.view(h.shape), y.view(h.shape)


@torch.library.triton_op("rsparse::rms_norm", mutates_args={})
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm(x) with this weight and eps, in x's dtype."""
    _check(x, weight)
    return _launch(x, None, weight, eps)[1]


@torch.library.triton_op("rsparse::add_rms_norm", mutates_args={})
def add_rms_norm(h: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LlamaRMSNorm(s)) for s = h + d: the residual stream after a block's branch and the next
    projection's input, in one launch."""
    _check(h, weight, d)
    return _launch(h, d, weight, eps)
