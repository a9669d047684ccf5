"""Teacher ensembling: hand-computed cases from the paper's definitions and properties."""
from __future__ import annotations

import numpy as np
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


def test_cross_sample_fills_from_the_other_teachers_in_cyclic_order():
    lists = [["a1"], ["b1", "a1", "b2"], ["c1"]]
    # u -> teacher index among the 3 with negatives: int(u * 3)
    assert E.cross_sample(lists, 4, 0.1) == [(0, 0), (1, 0), (1, 2), (2, 0)]  # a1 | b1, (a1 taken), b2 | c1
    assert E.cross_sample(lists, 4, 0.5) == [(1, 0), (1, 1), (1, 2), (2, 0)]  # b1 a1 b2 | c1
    assert E.cross_sample(lists, 4, 0.9) == [(2, 0), (0, 0), (1, 0), (1, 2)]  # c1 | a1 | b1, (a1), b2 (wraps)
    assert E.cross_sample(lists, 2, 0.1) == [(0, 0), (1, 0)]
    assert E.cross_sample([["x"], None, ["x"]], 3, 0.0) == [(0, 0)]  # fill never repeats a taken id
    assert E.cross_sample([[], ["b1", "b2"]], 3, 0.0) == [(1, 0), (1, 1)]  # short everywhere: short, not padded


def _arrays(method, lists, n, u, width):
    nt = len(lists)
    lens = np.array([[0 if x is None else len(x) for x in lists]])
    codes = np.full((1, nt, width), -1, np.int64)
    for t, x in enumerate(lists):
        if x:
            codes[0, t, : min(len(x), width)] = x[:width]
    pt, pp, cnt, redo = E.ensemble_arrays(method, lens, n, np.array([u]), codes,
                                          present=np.array([[x is not None for x in lists]]))
    return [(int(pt[0, i]), int(pp[0, i])) for i in range(cnt[0])], bool(redo[0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.integers(0, 12), max_size=9)), min_size=1, max_size=4),
       st.integers(0, 6), st.floats(0, 0.999), st.sampled_from(E.ENSEMBLE_METHODS), st.integers(1, 12))
def test_property_batch_form_equals_list_form(lists, n, u, method, width):
    """ensemble_arrays == ensemble on every input; with unique ids a window of 2n never needs a redo."""
    want = E.ensemble(method, lists, n, u)
    got, redo = _arrays(method, lists, n, u, width)
    if not redo:
        assert got == want
    full, redo_full = _arrays(method, lists, n, u, max([len(x) for x in lists if x] + [1]))
    assert not redo_full and full == want
    uniq = [None if x is None else list(dict.fromkeys(x)) for x in lists]
    if n:
        assert _arrays(method, uniq, n, u, 2 * n) == (E.ensemble(method, uniq, n, u), False)
