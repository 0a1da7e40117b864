"""Ticket counters of the kernels that merge partials in the program drawing the last ticket (the
split GEMV's output tiles, `splitk`; the decode attention's splits, `attention`).

Each counter is zero when a launch starts; the program that draws its last ticket merges, then
stores zero again, so an owner that outlives the calls (a module buffer, the decoder) zeroes its
counters once and no launch pays a zero-fill. A CUDA graph holds no reference to what it captured:
counters must live as long as any graph that replays a call on them (session 23: counters freed
with a replaced closure were reused by a position tensor while graphs still wrote to them).
"""
import torch


def counters(n: int, device) -> torch.Tensor:
    """n zeroed int32 counters."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def check_counters(t: torch.Tensor, need: int, name: str, count: str, device, maker: str) -> None:
    """Raise ValueError unless t is a contiguous int32 vector of at least `need` counters on device
    (their zero state cannot be checked without a sync; every call leaves them zeroed). count: how
    the message states `need`; maker: the function that makes them."""
    if t.dtype != torch.int32 or t.dim() != 1 or t.numel() < need or t.stride(0) != 1 or t.device != torch.device(device):
        raise ValueError(f"{name} must be a contiguous int32 vector of at least {count} zeros on {device} (`{maker}`), "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
