"""IntervalSet (app/engine/intervals.py) against a plain set of integers."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.engine.intervals import IntervalSet

ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 200), st.integers(0, 60)), min_size=1, max_size=40
)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(ops)
def test_add_and_remove_match_a_set_model(steps: list[tuple[bool, int, int]]) -> None:
    s, model = IntervalSet(), set()
    for add, start, n in steps:
        if add:
            s.add(start, start + n)
            model |= set(range(start, start + n))
        else:
            gone = model & set(range(start, start + n))
            assert s.remove(start, start + n) == len(gone)
            model -= gone
    assert s.total() == len(model)
    assert {x for a, b in s for x in range(a, b)} == model
    # runs are disjoint, sorted and never touch (adjacent ones merge)
    pairs = list(s)
    assert all(a < b for a, b in pairs)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(pairs, pairs[1:], strict=False))
    assert [x for x in range(0, 270) if s.contains(x)] == sorted(model)
    assert s.overlap(50, 120) == len(model & set(range(50, 120)))
    assert s.mask(40, 30).tolist() == [x in model for x in range(40, 70)]
    assert s.clipped(10, 90) == [
        (max(a, 10), min(b, 90)) for a, b in pairs if max(a, 10) < min(b, 90)
    ]
    assert IntervalSet([tuple(p) for p in s.to_list()]).to_list() == s.to_list()


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 40)), max_size=30),
    st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 40)), min_size=0, max_size=200),
)
@example([(10, 5), (700, 0)], [(i * 8 % 999, i % 9) for i in range(150)])
def test_add_many_is_add_of_each(
    before: list[tuple[int, int]], runs: list[tuple[int, int]]
) -> None:
    """Below and above the 64 pairs where add_many switches to one sorted numpy pass; empty
    and touching runs included."""
    one, many = IntervalSet(), IntervalSet()
    for s, n in before:
        one.add(s, s + n)
        many.add(s, s + n)
    pairs = [(s, s + n) for s, n in runs]
    for s, e in pairs:
        one.add(s, e)
    many.add_many(pairs)
    assert many.to_list() == one.to_list()
    assert many.total() == one.total()
