"""Filters against hand-computed cases from the paper's definitions, plus hypothesis properties."""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from raymine import filters as F
from raymine.config import MineConfig


def cfg(**kw) -> MineConfig:
    return dataclasses.replace(MineConfig(), **kw)


def pad(rows, fill, dtype):
    """Ragged rows -> (padded [n, max], valid)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    return out, valid


# ------------------------------------------------------------------------------------------------
def test_score_ceiling_every_method_hand_computed():
    pos = [np.array([0.9, 0.8], np.float32), np.array([0.5], np.float32), np.array([-0.4], np.float32),
           np.array([], np.float32), np.array([np.nan, 0.6], np.float32), np.array([np.nan], np.float32)]
    c = F.score_ceiling(cfg(method="naive"), pos)
    assert c.dtype == np.float32 and np.isinf(c[:3]).all() and np.isnan(c[3]) and np.isnan(c[5])
    assert np.isinf(F.score_ceiling(cfg(method="shifted"), pos)[4])
    np.testing.assert_allclose(F.score_ceiling(cfg(method="abs", abs_threshold=0.7), pos)[[0, 1, 2, 4]], 0.7)
    np.testing.assert_allclose(F.score_ceiling(cfg(method="marginpos", margin=0.05), pos)[[0, 1, 2, 4]],
                               [0.75, 0.45, -0.45, 0.55], rtol=1e-6)
    # percpos, min positive: 0.8*0.95, 0.5*0.95, sign-safe -0.4 - 0.4*0.05 = -0.42, NaN ignored: 0.6*0.95
    np.testing.assert_allclose(F.score_ceiling(cfg(method="percpos", perc=0.95), pos)[[0, 1, 2, 4]],
                               [0.76, 0.475, -0.42, 0.57], rtol=1e-6)
    # pos_reduce: mean / max of the *query's own* positives
    np.testing.assert_allclose(F.score_ceiling(cfg(method="marginpos", pos_reduce="mean"), pos)[0], 0.80, rtol=1e-6)
    np.testing.assert_allclose(F.score_ceiling(cfg(method="marginpos", pos_reduce="max"), pos)[0], 0.85, rtol=1e-6)


def test_percpos_ceiling_is_sign_safe():
    pos = np.array([1.0, 0.2, 0.0, -0.2, -3.0], np.float32)
    c = F.percpos_ceiling(pos, 0.9)
    np.testing.assert_allclose(c, [0.9, 0.18, 0.0, -0.22, -3.3], rtol=1e-6)
    assert (c <= pos).all() and (c[pos != 0] < pos[pos != 0]).all()


def test_required_depth():
    assert F.required_depth(cfg(method="shifted", shift=10, num_negatives=4, sampling="top"), 3) == 17
    assert F.required_depth(cfg(method="percpos", num_negatives=4, sampling="top1_sampled", sample_top_k=10), 2) == 12
    assert F.required_depth(cfg(method="naive", num_negatives=4, sampling="top"), 0) == 4
    assert F.required_depth(cfg(method="abs", num_negatives=12, sampling="sampled", sample_top_k=10), 1) == 13


def test_filters_hand_computed_uneven_positives_negative_scores():
    # query 0: positives d1, d3 (scores 0.9, 0.7); query 1: one positive d9 (score -0.2), all scores negative
    ids, valid = pad([["d1", "d2", "d3", "d4", "d5"], ["d7", "d9", "d8"]], "", object)
    scores, _ = pad([[0.9, 0.8, 0.7, 0.66, 0.5], [-0.1, -0.2, -0.25]], -np.inf, np.float32)
    pid, pval = pad([["d1", "d3"], ["d9"]], "", object)
    eid, evalid = pad([["d4"], []], "", object)

    keep, n = F.drop_positives(ids, valid, pid, pval)
    assert n == 3 and keep.tolist() == [[False, True, False, True, True], [True, False, True, False, False]]
    keep2, n2 = F.drop_excluded(ids, keep, eid, evalid)
    assert n2 == 1 and keep2[0].tolist() == [False, True, False, False, True]

    pos = F.reduce_positive_scores([np.array([0.9, 0.7]), np.array([-0.2])])  # min: 0.7, -0.2
    # percpos 0.95: ceilings 0.665 and -0.21 -> query 0 drops d2 (0.8); query 1 drops d7 (-0.1), keeps d8 (-0.25)
    k3, n3 = F.percpos_filter(scores, keep2, pos, 0.95)
    assert n3 == 2 and k3.tolist() == [[False, False, False, False, True], [False, False, True, False, False]]
    # the naive pos*perc rule would have admitted nothing for query 1 above -0.19 -> d7 (-0.1) is above pos
    k4, n4 = F.marginpos_filter(scores, keep, pos, 0.05)  # ceilings 0.65, -0.25 (strict)
    assert k4.tolist() == [[False, False, False, False, True], [False, False, False, False, False]] and n4 == 4
    k5, n5 = F.abs_filter(scores, keep, 0.66)  # strict: 0.66 itself is dropped
    assert k5[0].tolist() == [False, False, False, False, True] and k5[1].tolist() == keep[1].tolist()
    assert n5 == 2
    k6, n6 = F.shift_filter(keep, 2)  # ranks counted among non-positives
    assert k6.tolist() == [[False, False, False, False, True], [False] * 5] and n6 == 4
    k7, n7 = F.method_filter(cfg(method="naive"), scores, keep, pos)
    assert (k7 == keep).all() and n7 == 0


def test_drop_listed_many_positives_uses_sorted_path_exactly():
    rng = np.random.default_rng(0)
    cand = rng.integers(0, 60, size=(7, 30))
    listed, lval = pad([rng.choice(60, size=s, replace=False) for s in [0, 40, 3, 25, 1, 59, 20]], -1, np.int64)
    keep, n = F.drop_listed(cand, np.ones_like(cand, bool), listed, lval)
    ref = np.array([[c not in set(listed[i][lval[i]]) for c in cand[i]] for i in range(7)])
    assert (keep == ref).all() and n == int((~ref).sum())
    skeep, sn = F.drop_listed(cand.astype(str).astype(object), np.ones_like(cand, bool), listed.astype(str).astype(object), lval)
    assert (skeep == ref).all() and sn == n


def test_apply_filters_counts_add_up():
    c = cfg(method="percpos", perc=0.95)
    ids, valid = pad([["a", "b", "c", "d"], ["e"], []], "", object)
    scores, _ = pad([[0.9, 0.85, 0.8, 0.1], [0.3], []], -np.inf, np.float32)
    pid, pval = pad([["a"], ["x"], ["y"]], "", object)
    eid, evalid = pad([["b"], [], []], "", object)
    pos = np.array([0.88, 0.5, 0.4], np.float32)  # ceilings 0.836, 0.475, 0.38
    keep, counts = F.apply_filters(c, ids, scores, valid, pid, pval, eid, evalid, pos)
    assert counts == {"positive": 1, "excluded": 1, "method": 0}  # c (0.8), d, e kept
    assert keep.sum() == 3
    keep, counts = F.apply_filters(cfg(method="percpos", exclude_identical_text=False), ids, scores, valid,
                                   pid, pval, eid, evalid, pos)
    assert counts == {"positive": 1, "excluded": 0, "method": 1}  # b (0.85 >= 0.836) now reaches the method
    assert F.method_label(c) == "percpos(0.95)" and F.method_label(cfg(method="naive")) == "naive"


# ------------------------------------------------------------------------------------------------
# Property: the production path (mine.mine_batch on an Arrow batch) against the paper's definitions
# ------------------------------------------------------------------------------------------------
GRID = 64  # scores and positives on a 1/64 grid, dyadic perc/margin: ceilings exact in float32 and float64


@st.composite
def batches(draw):
    nq = draw(st.integers(1, 6))
    rows = []
    for _ in range(nq):
        k = draw(st.integers(0, 12))  # empty candidate lists included
        cand = draw(st.lists(st.integers(0, 25), min_size=k, max_size=k, unique=True))
        sc = sorted(draw(st.lists(st.integers(-2 * GRID, 2 * GRID), min_size=k, max_size=k)), reverse=True)
        npos = draw(st.integers(0, 20))  # uneven positive counts
        pos_ids = draw(st.lists(st.integers(0, 25), min_size=npos, max_size=npos, unique=True))
        pos_sc = draw(st.lists(st.one_of(st.none(), st.integers(-2 * GRID, 2 * GRID)), min_size=npos, max_size=npos))
        exc = draw(st.lists(st.integers(0, 25), max_size=3, unique=True))
        rows.append((cand, [x / GRID for x in sc], pos_ids, [None if x is None else x / GRID for x in pos_sc], exc))
    method = draw(st.sampled_from(["naive", "shifted", "abs", "marginpos", "percpos"]))
    c = cfg(method=method, shift=draw(st.integers(0, 4)), abs_threshold=draw(st.integers(-GRID, GRID)) / GRID,
            margin=draw(st.sampled_from([0.0, 0.125, 0.25, 0.5])), perc=draw(st.sampled_from([0.5, 0.75, 0.875, 1.0])),
            pos_reduce=draw(st.sampled_from(["min", "mean", "max"])),
            exclude_identical_text=draw(st.booleans()), sampling="top", num_negatives=13)
    return c, rows


def paper_ceiling(c, pos_scores):
    """The paper's rule for one query, in float64: None when it has no positive score."""
    vals = [x for x in pos_scores if x is not None]
    if not vals:
        return None
    pos = {"min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals)}[c.pos_reduce]
    if c.method == "abs":
        return c.abs_threshold
    if c.method == "marginpos":
        return pos - c.margin
    if c.method == "percpos":  # sign-safe: below the positive whatever its sign
        return pos * c.perc if pos >= 0 else pos * (2 - c.perc)
    return np.inf


@settings(max_examples=150, deadline=None)
@given(batches())
def test_property_no_positive_and_ceilings_hold(data):
    """The mining stage's own batch function keeps exactly the candidates the definitions keep, in rank order,
    and its per-query drop counts explain every candidate."""
    import pyarrow as pa

    from raymine import columns as C
    from raymine import mine as M

    c, rows = data
    strs = pa.list_(pa.string())
    t = pa.table({
        C.QUERY_ID: [f"q{i}" for i in range(len(rows))], C.QUERY: [f"text {i}" for i in range(len(rows))],
        f"{C.CANDIDATE_IDS}@T": pa.array([[f"d{d}" for d in r[0]] for r in rows], strs),
        f"{C.CANDIDATE_SCORES}@T": pa.array([r[1] for r in rows], pa.list_(pa.float32())),
        f"{C.POSITIVE_IDS}@T": pa.array([[f"d{d}" for d in r[2]] for r in rows], strs),
        f"{C.POSITIVE_SCORES}@T": pa.array([r[3] for r in rows], pa.list_(pa.float32())),
        f"{C.EXCLUDED_IDS}@T": pa.array([[f"d{d}" for d in r[4]] for r in rows], strs),
    })
    out = M.mine_batch(t, c, ["T"], ensemble=False).to_pylist()
    assert len(out) == len(rows)
    for o, (cand, sc, pos_ids, pos_sc, exc) in zip(out, rows, strict=True):
        ceil = paper_ceiling(c, pos_sc)
        if ceil is None:  # no scorable positive: dropped for every method
            assert o["_reason"] == "no_positive_score" and o[C.NEGATIVE_IDS] is None
            continue
        banned = set(pos_ids) | (set(exc) if c.exclude_identical_text else set())
        listed = [j for j, d in enumerate(cand) if d not in banned]
        kept = listed[c.shift:] if c.method == "shifted" else [j for j in listed if sc[j] < ceil]
        want = [f"d{cand[j]}" for j in kept]
        assert (o[C.NEGATIVE_IDS] or []) == want
        assert o["_reason"] == (None if want else "no_negatives")
        assert not set(o[C.NEGATIVE_IDS] or []) & {f"d{d}" for d in pos_ids}  # no positive ever returned
        n_pos = sum(d in set(pos_ids) for d in cand)
        n_exc = sum(d in set(exc) and d not in set(pos_ids) for d in cand) if c.exclude_identical_text else 0
        assert (o["_drop_positive@T"], o["_drop_excluded@T"], o["_kept@T"]) == (n_pos, n_exc, len(kept))
        assert o["_drop_method@T"] == len(listed) - len(kept) and o["_seen@T"] == len(cand)
