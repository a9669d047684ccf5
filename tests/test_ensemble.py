"""Teacher ensembling: hand-computed cases from the paper's definitions and properties."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymine import ensemble as E


def ids(lists, picks):
    return [lists[t][j] for t, j in picks]


def test_intra_sample_hand_computed():
    a = ["d1", "d2", "d3", "d4", "d5"]
    b = ["d2", "d1", "d6", "d7"]
    lists = [a, b]
    # round robin: a1 b1 a2 b2 -> d1 d2 d2 d1 (duplicates kept)
    assert ids(lists, E.intra_sample_no_dedup(lists, 4)) == ["d1", "d2", "d2", "d1"]
    # dedup: a1=d1, b1=d2, a's next unique: d2 taken -> d3, b's next unique: d1 taken -> d6
    assert ids(lists, E.intra_sample_dedup(lists, 4)) == ["d1", "d2", "d3", "d6"]
    assert E.intra_sample_dedup(lists, 4) == [(0, 0), (1, 0), (0, 2), (1, 2)]
    # n odd: the first teacher gets the extra one
    assert ids(lists, E.intra_sample_no_dedup(lists, 3)) == ["d1", "d2", "d2"]


def test_intra_sample_exhausted_and_missing_teachers():
    lists = [["x"], None, ["y", "z", "w"]]
    assert ids(lists, E.intra_sample_no_dedup(lists, 4)) == ["x", "y", "z", "w"]
    assert ids(lists, E.intra_sample_dedup([["x"], ["x"]], 3)) == ["x"]  # short, never padded
    assert E.intra_sample_no_dedup([None, None], 3) == []


def test_cross_sample_and_single_teacher_identity():
    lists = [["a1", "a2", "a3"], ["b1", "b2"], []]
    assert E.cross_sample(lists, 2, 0.0) == [(0, 0), (0, 1)]
    assert E.cross_sample(lists, 2, 0.99) == [(1, 0), (1, 1)]  # the empty teacher is never drawn
    assert E.cross_sample([[], None], 2, 0.5) == []
    for m in E.ENSEMBLE_METHODS:
        assert E.ensemble(m, [None, ["a", "a", "b"]], 2, 0.7) == [(1, 0), (1, 1)]
    with pytest.raises(ValueError, match="mine.ensemble"):
        E.ensemble("vote", [["a"], ["b"]], 1, 0.1)


def test_cross_sample_draws_teachers_uniformly():
    import numpy as np

    from raymine.sampling import STREAM_TEACHER, query_seeds, uniforms

    u = uniforms(query_seeds(13, [f"q{i}" for i in range(30_000)]), 1, STREAM_TEACHER)[:, 0]
    lists = [["a"], ["b"], ["c"]]
    counts = np.bincount([E.cross_sample(lists, 1, x)[0][0] for x in u], minlength=3)
    assert (np.abs(counts / 30_000 - 1 / 3) < 0.015).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.integers(0, 12), max_size=8, unique=True)), min_size=1, max_size=4),
       st.integers(0, 10))
def test_property_intra(lists, n):
    nd = E.intra_sample_no_dedup(lists, n)
    dd = E.intra_sample_dedup(lists, n)
    total = sum(len(x) for x in lists if x is not None)
    distinct = len({d for x in lists if x is not None for d in x})
    assert len(nd) == min(n, total)
    assert len(dd) == min(n, distinct)
    assert len(set(ids(lists, dd))) == len(dd)  # dedup: no duplicates
    for picks in (nd, dd):  # each teacher's picks come in its own order
        for t in range(len(lists)):
            pos = [j for tt, j in picks if tt == t]
            assert pos == sorted(pos)
