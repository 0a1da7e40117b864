"""The threshold the kernel tests (Triton, C++) set for a target sparsity, against a float64 oracle."""
import torch

NEAR = 4  # neighbouring gaps looked at on each side of the quantile's


def tau_between(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Halfway across the widest gap between neighbouring sorted scores within NEAR places of the
    `sparsity` quantile, so that no score sits near the threshold, where float32 (kernel) and float64
    (oracle) products, or the threshold rounded to float32, could fall on different sides; -1 (below
    every score) at sparsity 0. A 0-d tensor of the scores' dtype.
    Why the widest gap and not the quantile's own: of 20,000 draws of test_kernels' 8 x 257 case at 70%,
    3 put two neighbouring scores within float32's resolution (1.1e-7 and 1.5e-7 apart), and the kernel
    then kept a channel the oracle dropped (relative error 0.04-0.06; it failed CI once, session 39)."""
    s = scores.reshape(-1).sort().values
    if sparsity <= 0:
        return torch.tensor(-1.0, dtype=s.dtype)
    k = min(int(sparsity * len(s)), len(s) - 2)
    lo, hi = max(0, k - NEAR), min(len(s) - 2, k + NEAR)
    k = lo + int((s[lo + 1:hi + 2] - s[lo:hi + 1]).argmax())
    return (s[k] + s[k + 1]) / 2
