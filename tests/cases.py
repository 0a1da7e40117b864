"""Parametrized grids that stay in CI's fast set as a covering sample.

`grid(*axes)` is the full product of the axes (each a list of values, or of tuples for several
argument names), as pytest params. Under Triton's interpreter (no GPU) only a sample of it runs by
default and the rest is marked slow (`pytest -m slow` runs it): for n < the longest axis and
k < reps, the case whose index on axis a is (n + k * (a + 1)) % len(axis a). So every value of every
axis runs, and with reps = 2 each value of the longest axis meets two values of every other axis
(two dtypes, for a dtype axis of 2). On a GPU every case runs: the kernels compile there, in seconds."""
import itertools

import pytest
import torch


def grid(*axes, reps: int = 2):
    sample = set()
    longest = max(len(a) for a in axes)
    for n, k in itertools.product(range(longest), range(reps)):
        sample.add(tuple((n + k * (a + 1)) % len(axis) for a, axis in enumerate(axes)))
    everything = torch.cuda.is_available()
    params = []
    for idx in itertools.product(*(range(len(a)) for a in axes)):
        values = ()
        for axis, i in zip(axes, idx):
            values += axis[i] if isinstance(axis[i], tuple) else (axis[i],)
        marks = () if everything or idx in sample else (pytest.mark.slow,)
        params.append(pytest.param(*values, marks=marks, id="-".join(map(_name, values))))
    return params


def _name(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def slow_on_cpu(*values):
    """One case kept out of the fast set under the interpreter (another case covers its code there)."""
    return pytest.param(*values, marks=() if torch.cuda.is_available() else (pytest.mark.slow,))
