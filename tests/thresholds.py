"""The threshold the kernel tests (Triton, C++) set for a target sparsity, against a float64 oracle."""
import torch


def tau_between(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Halfway between the two neighbouring scores at the `sparsity` quantile, so that no score sits on
    the threshold, where float32 (kernel) and float64 (oracle) products could fall on different sides;
    -1 (below every score) at sparsity 0. A 0-d tensor of the scores' dtype."""
    s = scores.reshape(-1).sort().values
    k = min(int(sparsity * len(s)), len(s) - 2)
    return (s[k] + s[k + 1]) / 2 if sparsity > 0 else torch.tensor(-1.0, dtype=s.dtype)
