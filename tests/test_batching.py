"""Token-budget micro-batches (saferlhf.trainers.batching): every sequence in exactly one pass, every pass
within the budget, as many passes as asked for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saferlhf.trainers.batching import longest, pass_tokens, split_by_tokens


def test_pass_tokens_counts_real_tokens_packed_and_the_padded_rectangle_padded():
    items = [(5, 3), (2, 7), (4, 1)]
    assert pass_tokens(items, packed=True) == 22
    # Padded: left-padded prompts to the longest (5), right-padded responses to the longest (7).
    assert pass_tokens(items, packed=False) == 3 * (5 + 7)
    assert pass_tokens([(4,), (9,)], packed=False) == 18
    assert pass_tokens([], packed=True) == 0
    assert longest(items) == 9
    # Preference pairs: every response is a right-padded row of its own.
    pairs = [(5, 8), (3, 4)]
    assert pass_tokens(pairs, packed=False, side_by_side=False) == 4 * 8
    assert longest(pairs, packed=False, side_by_side=False) == 16


def test_packed_passes_are_balanced_and_within_the_budget():
    items = [(10,)] * 6 + [(30,)] * 2
    parts = split_by_tokens(items, 40, packed=True)
    loads = [sum(items[i][0] for i in p) for p in parts]
    assert max(loads) <= 40 and sum(loads) == 120
    assert len(parts) == 3  # 120 tokens in 40-token passes, exactly filled


def test_padded_passes_are_runs_of_the_length_order():
    items = [(2, 30), (2, 2), (2, 31), (2, 3), (2, 29), (2, 1)]
    parts = split_by_tokens(items, 70, packed=False)
    order = sorted(range(len(items)), key=lambda i: -sum(items[i]))  # 2, 0, 4, 3, 1, 5
    runs = sorted(sorted(order.index(i) for i in part) for part in parts)
    assert all(run == list(range(run[0], run[0] + len(run))) for run in runs)  # consecutive in that order
    assert [sorted(p) for p in parts] == [[0, 2], [3, 4], [1, 5]]
    assert all(pass_tokens([items[i] for i in p], packed=False) <= 70 for p in parts)


def test_more_passes_than_needed_and_more_than_sequences():
    items = [(3,)] * 5
    assert len(split_by_tokens(items, 100, packed=True, min_parts=4)) == 4
    parts = split_by_tokens(items[:2], 100, packed=False, min_parts=4)
    assert len(parts) == 4 and sorted(i for p in parts for i in p) == [0, 1] and parts.count([]) == 2


def test_a_non_positive_budget_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        split_by_tokens([(1,)], 0, packed=True)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 60)), min_size=1, max_size=40),
       budget=st.integers(200, 400), packed=st.booleans(), min_parts=st.integers(1, 8), side=st.booleans())
def test_every_sequence_once_and_every_pass_within_the_budget(lengths, budget, packed, min_parts, side):
    parts = split_by_tokens(lengths, budget, packed=packed, min_parts=min_parts, side_by_side=side)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert len(parts) >= min_parts
    for part in parts:
        assert part == sorted(part)
        assert pass_tokens([lengths[i] for i in part], packed, side) <= budget
