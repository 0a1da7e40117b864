"""Byte budgets: never exceeded, true shapes (GQA), model-level accounting."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsparse.budget import Allocation, RankRule, allocate, model_sparsity
from rsparse.errors import RSparseError


@settings(max_examples=400, deadline=None)
@given(out_f=st.integers(1, 20000), in_f=st.integers(1, 20000), s=st.floats(0, 0.999), alpha=st.floats(0, 1))
def test_budget_never_exceeded(out_f, in_f, s, alpha):
    a = allocate(out_f, in_f, s, alpha)
    budget = (1 - s) * out_f * in_f
    assert a.elements(out_f, in_f) <= budget * (1 + 1e-9) + 1e-6
    assert 0.0 <= a.keep <= 1.0 and 0 <= a.rank <= min(out_f, in_f)
    # nothing is left on the table beyond what one more rank would cost... or channels are full
    assert a.keep == 1.0 or budget - a.elements(out_f, in_f) <= 1e-6 * budget + 1e-6


def test_hand_case_gqa_shapes():
    # SmolLM2 block: q/o 576x576, k/v 192x576 (3 KV heads of 64), gate/up 1536x576, down 576x1536
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
              "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
    a = allocate(192, 576, 0.5, 0.9)
    # budget 55296; rank floor(0.1 * 55296 / 768) = 7; keep (55296 - 7 * 768) / 110592
    assert a.rank == 7 and a.keep == pytest.approx((55296 - 7 * 768) / 110592)
    allocs = {k: allocate(o, i, 0.5, 0.9) for k, (o, i) in shapes.items()}
    assert model_sparsity(allocs, shapes) == pytest.approx(0.5, abs=1e-12)
    # dropping every k/v byte saves only k/v's share of the bytes, not 2/7 of them
    only_kv = {"k": Allocation(0.0, 0), "v": Allocation(0.0, 0)}
    assert model_sparsity(only_kv, shapes) == pytest.approx(2 * 192 * 576 / sum(o * i for o, i in shapes.values()))


@pytest.mark.parametrize("s", [-0.1, 1.0, float("nan")])
def test_bad_sparsity(s):
    with pytest.raises(RSparseError, match="sparsity"):
        allocate(10, 10, s, 0.9)


@settings(max_examples=200, deadline=None)
@given(out_f=st.integers(1, 20000), in_f=st.integers(1, 20000), s=st.floats(0, 0.999), alpha=st.floats(0, 1),
       multiple=st.sampled_from([1, 2, 16, 64]))
def test_rank_multiple_keeps_the_budget(out_f, in_f, s, alpha, multiple):
    a, free = allocate(out_f, in_f, s, alpha, multiple), allocate(out_f, in_f, s, alpha)
    assert a.rank % multiple == 0 and free.rank - multiple < a.rank <= free.rank
    assert a.elements(out_f, in_f) <= (1 - s) * out_f * in_f * (1 + 1e-9) + 1e-6
    assert a.keep == 1.0 or abs(a.elements(out_f, in_f) - free.elements(out_f, in_f)) <= 1e-6 * out_f * in_f


def test_rank_rule_hand_case():
    ranks = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
    assert RankRule().allowed(ranks) == list(range(len(ranks)))
    assert [ranks[j] for j in RankRule(multiple=16).allowed(ranks)] == [0, 16, 32, 48, 64]
    assert [ranks[j] for j in RankRule(max_rank=24, multiple=8).allowed(ranks)] == [0, 8, 16, 24]
    assert RankRule(max_rank=0).allowed(ranks) == [0]
    assert RankRule(cost=3.0).elements(16, 192, 576) == 3.0 * 16 * 768
    # k at 50%, alpha 0.9 gives rank 7 (hand case above): a multiple of 16 leaves none, the budget to channels
    a = allocate(192, 576, 0.5, 0.9, 16)
    assert a.rank == 0 and a.keep == pytest.approx(0.5)


@pytest.mark.parametrize("kw,match", [({"multiple": 0}, "rank_multiple"), ({"multiple": 1.5}, "rank_multiple"),
                                      ({"multiple": True}, "rank_multiple"), ({"cost": 0.5}, "rank_cost"),
                                      ({"cost": float("nan")}, "rank_cost"), ({"cost": float("inf")}, "rank_cost")])
def test_bad_rank_rule(kw, match):
    with pytest.raises(RSparseError, match=match):
        RankRule(**kw)
