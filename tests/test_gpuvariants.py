"""The bench's A/B variants: which compiled steps a flag adds, and that the switches a variant sets
hold only while its step is traced (restored after it, also when tracing fails)."""
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from rsparse.errors import RSparseError  # noqa: E402
from rsparse.gpuvariants import compile_options, compiled_variants, rank_modes  # noqa: E402
from rsparse.kernels import module as km  # noqa: E402
from rsparse.kernels import triton_gemv as tg  # noqa: E402


def _args(**kw):
    base = dict(compare_reduce=False, pdl=False, masked_dense=False, compare_rank=None)
    return SimpleNamespace(**dict(base, **kw))


def test_variants_follow_the_flags():
    plain = compiled_variants(_args(), "fused", "S", "G", 1)
    assert [(v[0], v[3]) for v in plain] == [("dense", {}), ("fused", {})]
    got = compiled_variants(_args(compare_rank="gather,epilogue", masked_dense=True), "fused", "S", "G", 1)
    assert [(v[0], v[3]) for v in got[2:]] == [("fused-rank-gather", {"rank_terms": "gather"}),
                                               ("fused-rank-epilogue", {"rank_terms": "epilogue"})]  # masked dense: batch > 1 only
    assert compiled_variants(_args(masked_dense=True), "fused", "S", "G", 4)[-1][3] == {"kernel_rows": 0}
    with pytest.raises(RSparseError, match=r"unknown rank mode\(s\) \['own-z'\]"):
        rank_modes(_args(compare_rank="one-launch,own-z"))


def test_compile_options_set_and_restore_the_switches():
    before = (tg.RANK_TERMS, km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS)
    with compile_options(consumer_reduce="none", kernel_rows=2, rank_terms="gather"):
        assert (tg.RANK_TERMS, km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS) == ("gather", "none", 2)
    assert (tg.RANK_TERMS, km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS) == before
    with pytest.raises(ZeroDivisionError):
        with compile_options(rank_terms="epilogue"):
            1 / 0
    assert tg.RANK_TERMS == before[0]
