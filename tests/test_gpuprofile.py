"""`rsparse bench --device cuda --profile`'s table (the profile itself needs a GPU): CUDA kernels
grouped by name per profiled step, CPU operators left out, largest first, a hand-computed case."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from rsparse.gpuprofile import kernel_table  # noqa: E402

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(device, name, us):
    return SimpleNamespace(device_type=device, name=name, device_time=us)


def test_kernel_table_by_hand():
    long = "k" * 95  # grouped by its first 90 characters: the two spellings are one kernel
    events = [_event(CUDA, "gemv", 10.0), _event(CUDA, "gemv", 14.0), _event(CUDA, "norm", 3.0),
              _event(CPU, "aten::mm", 100.0), _event(CUDA, long, 30.0), _event(CUDA, long[:90] + "zz", 2.0)]
    total, launches, top = kernel_table(events, steps=2)
    assert total == pytest.approx((10 + 14 + 3 + 30 + 2) / 2)  # the CPU operator's 100 us is not counted
    assert launches == pytest.approx(5 / 2)
    assert top == [(long[:90], pytest.approx(16.0), pytest.approx(1.0)), ("gemv", pytest.approx(12.0), pytest.approx(1.0)),
                   ("norm", pytest.approx(1.5), pytest.approx(0.5))]
    assert kernel_table(events, steps=2, top=1)[2] == top[:1]
    assert kernel_table([_event(CPU, "aten::mm", 1.0)], steps=3) == (0, 0, [])
