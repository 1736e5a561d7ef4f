import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from miniplm.core.apportion import largest_remainder
from miniplm.selection.topk import exact_top, sortable


def stream_of(ids, keys, weights, chunk=97):
    def stream():
        for s in range(0, len(ids), chunk):
            yield ids[s:s + chunk], keys[s:s + chunk], weights[s:s + chunk]
    return stream


def brute_rank(ids, keys):
    """Indices by key descending, ties by id ascending."""
    return np.lexsort((ids, -keys))


def selected(cut, ids, keys):
    return set() if cut is None else set(ids[cut.selects(ids, keys)].tolist())


def test_sortable_preserves_float_order():
    values = np.array([-np.inf, -1e300, -2.5, -1e-300, -0.0, 0.0, 1e-300, 3.0, 1e300, np.inf])
    u = sortable(values)
    assert u[4] == u[5]  # -0.0 and 0.0 tie
    assert all(int(a) < int(b) for a, b in zip(u[[0, 1, 2, 3, 5, 6, 7, 8]], u[[1, 2, 3, 4, 6, 7, 8, 9]]))


@pytest.mark.parametrize("seed", range(6))
def test_top_k_equals_brute_force_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    ids = rng.permutation(n).astype(np.int64) * 3  # ids need not be dense or sorted
    keys = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # few distinct values: heavy ties
    weights = rng.integers(1, 50, size=n)
    for k in {1, n // 3, n // 2, n}:
        cut = exact_top(stream_of(ids, keys, weights), k, max_candidates=int(rng.integers(1, 50)))
        expected = set(ids[brute_rank(ids, keys)[:k]].tolist())
        assert selected(cut, ids, keys) == expected
        assert cut.selected_rows == k


@pytest.mark.parametrize("seed", range(4))
def test_token_budget_takes_the_longest_fitting_prefix(seed):
    rng = np.random.default_rng(100 + seed)
    n = 1500
    ids = np.arange(n, dtype=np.int64)
    keys = np.round(rng.normal(size=n), 1)
    weights = rng.integers(1, 200, size=n)
    order = brute_rank(ids, keys)
    cumulative = np.cumsum(weights[order])
    for budget in (0, 5, int(cumulative[n // 2]), int(cumulative[n // 2]) + 1, int(cumulative[-1]), 10**9):
        cut = exact_top(stream_of(ids, keys, weights), budget, by_weight=True, max_candidates=30)
        take = int(np.searchsorted(cumulative, budget, side="right"))
        assert selected(cut, ids, keys) == set(ids[order[:take]].tolist())
        if cut is not None:
            assert cut.selected_weight == int(cumulative[take - 1]) <= budget


def test_all_equal_keys_break_ties_by_id_and_memory_stays_bounded():
    n = 5000
    ids = np.arange(n, dtype=np.int64)[::-1].copy()
    keys = np.zeros(n)
    cut = exact_top(stream_of(ids, keys, np.ones(n, dtype=np.int64)), 1234, max_candidates=100)
    assert selected(cut, ids, keys) == set(range(1234))
    assert cut.passes > 2  # the tie had to be resolved on the id digits, not in one big sort


def test_nothing_to_keep():
    ids = np.arange(10, dtype=np.int64)
    assert exact_top(stream_of(ids, np.ones(10), np.ones(10, dtype=np.int64)), 0) is None
    assert exact_top(stream_of(ids, np.ones(10), np.full(10, 5)), 4, by_weight=True) is None


@given(total=st.integers(0, 10_000), weights=st.lists(st.integers(0, 1_000), min_size=1, max_size=9))
def test_largest_remainder_gives_each_its_share_within_one(total, weights):
    """Shares sum to the total, each within one of its exact share, and a larger weight never gets less."""
    shares = largest_remainder(total, weights)
    if sum(weights) == 0:
        assert shares.tolist() == [0] * len(weights)
        return
    exact = np.array(weights) * total / sum(weights)
    assert shares.sum() == total
    assert np.all(np.abs(shares - exact) < 1)
    for i in range(len(weights)):
        for j in range(len(weights)):
            if weights[i] > weights[j]:
                assert shares[i] >= shares[j]


def test_largest_remainder_hands_the_rounding_to_the_largest_remainders_then_the_lower_index():
    assert largest_remainder(10, [1, 1, 1]).tolist() == [4, 3, 3]  # equal remainders: the first domain
    assert largest_remainder(7, [50, 30, 20]).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4 -> the 0.5 first
    with pytest.raises(ValueError, match="finite weights >= 0"):
        largest_remainder(3, [1, -1])
