"""Sampling modes: hand-computed cases, the softmax law, and independence of batching."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from raymine import sampling as S
from raymine.config import MineConfig


def cfg(**kw) -> MineConfig:
    return dataclasses.replace(MineConfig(), **kw)


def test_fnv1a64_known_values_and_slices():
    import pyarrow as pa

    h = S.fnv1a64(["", "a", "foobar"])
    # published FNV-1a 64 test vectors
    assert h.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    arr = pa.array(["zz", "a", "é-ü", "foobar"]).slice(1)
    assert S.fnv1a64(arr)[[0, 2]].tolist() == [0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert S.fnv1a64(np.array(["é-ü"], dtype=object))[0] == S.fnv1a64(arr)[1]


def test_query_seeds_stable_across_processes():
    here = S.query_seeds(13, ["q1", "q2"]).tolist()
    code = "from raymine.sampling import query_seeds; print(query_seeds(13, ['q1', 'q2']).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "7"}, cwd=".").stdout.strip()
    assert there == str(here)
    assert S.query_seeds(14, ["q1"])[0] != here[0]


def test_top_hand_computed():
    keep = np.array([[False, True, True, False, True, True], [True, False, False, False, False, False]])
    assert S.top(keep, 2).tolist() == [[False, True, True, False, False, False], [True] + [False] * 5]
    idx, cnt = S.gather(S.top(keep, 3), 3)
    assert idx.tolist() == [[1, 2, 4], [0, -1, -1]] and cnt.tolist() == [3, 1]


def _s(mode, scores, keep, n, k, ids, weighting="uniform", T=1.0, teacher="t", seed=1):
    c = cfg(sampling=mode, num_negatives=n, sample_top_k=k, sample_weighting=weighting, sample_temperature=T,
            seed=seed)
    return S.sample(c, scores, keep, ids, teacher)


def test_sampled_only_from_first_k_kept_and_top1_always_first():
    nq, k = 500, 12
    keep = np.ones((nq, k), bool)
    keep[:, [0, 3]] = False  # kept ranks: cols 1,2,4,5,6,...
    scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (nq, 1))
    ids = [f"q{i}" for i in range(nq)]
    for w in ("uniform", "softmax"):
        ch = _s("sampled", scores, keep, 3, 5, ids, w)  # first 5 kept = cols 1,2,4,5,6
        assert (ch.sum(1) == 3).all() and not ch[:, [0, 3, 7, 8, 9, 10, 11]].any()
        assert ch[:, [1, 2, 4, 5, 6]].all(axis=0).sum() == 0 and ch[:, [1, 2, 4, 5, 6]].any(axis=0).all()
        t1 = _s("top1_sampled", scores, keep, 3, 5, ids, w)
        assert t1[:, 1].all() and (t1.sum(1) == 3).all() and not t1[:, [0, 3, 7, 8, 9, 10, 11]].any()
        # n >= eligible: everything eligible
        assert (_s("sampled", scores, keep, 9, 5, ids, w) == (keep & (S.kept_rank(keep) < 5))).all()
        # short lists: fewer than n kept -> all of them, no padding
        short = np.zeros((nq, k), bool)
        short[:, 5] = True
        assert (_s("top1_sampled", scores, short, 4, 10, ids, w) == short).all()
    # softmax, temperature -> 0: the top n
    assert (_s("sampled", scores, keep, 3, 5, ids, "softmax", 1e-4) == S.top(keep, 3)).all()
    assert (_s("top", scores, keep, 3, 5, ids) == S.top(keep, 3)).all()


def _inclusion(p, n):
    """P(i among n draws without replacement, successive draws p renormalised), by enumerating orders."""
    import itertools

    out = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), n):
        pr, left = 1.0, 1.0
        for i in seq:
            pr *= p[i] / left
            left -= p[i]
        out[list(seq)] += pr
    return out


def test_uniform_sampling_frequencies():
    """'Randomly sample n of the top-k': every candidate of the window with probability n / w, every
    n-subset equally likely, whatever the scores (empirical frequencies, fixed seed, 4-sigma tolerance)."""
    nq = 40_000
    s = np.array([9.0, 0.5, 0.4, -3.0, -50.0, 7.0], np.float32)  # scores, kept ranks 0..4 (rank 5 not kept)
    keep = np.array([True, True, True, True, True, False])
    ids = [f"query-{i}" for i in range(nq)]
    ch = _s("sampled", np.tile(s, (nq, 1)), np.tile(keep, (nq, 1)), 2, 5, ids)
    freq, p = ch[:, :5].mean(0), 2 / 5
    assert (np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / nq)).all(), freq
    assert not ch[:, 5].any()
    pairs = np.unique(ch[:, :5] @ (1 << np.arange(5)), return_counts=True)[1] / nq  # 10 pairs, 1/10 each
    assert len(pairs) == 10 and (np.abs(pairs - 0.1) < 4 * np.sqrt(0.09 / nq)).all(), pairs
    t1 = _s("top1_sampled", np.tile(s, (nq, 1)), np.tile(keep, (nq, 1)), 3, 5, ids)
    assert t1[:, 0].all()
    f1 = t1[:, 1:5].mean(0)  # 2 of the 4 ranks 2..5: 1/2 each
    assert (np.abs(f1 - 0.5) < 4 * np.sqrt(0.25 / nq)).all(), f1


def test_softmax_sampling_follows_normalised_scores():
    """p = softmax(z / T), z = min-max normalised scores of the window; inclusion probabilities of 2 draws."""
    nq = 40_000
    s = np.array([1.0, 0.5, 0.0, -1.0], np.float32)
    T = 0.5
    z = (s - s.min()) / (s.max() - s.min())  # [1, .75, .5, 0]
    p = np.exp(z / T) / np.exp(z / T).sum()
    incl = _inclusion(p, 2)
    ids = [f"query-{i}" for i in range(nq)]
    ch = _s("sampled", np.tile(s, (nq, 1)), np.ones((nq, 4), bool), 2, 10, ids, "softmax", T)
    assert (np.abs(ch.mean(0) - incl) < 4 * np.sqrt(incl * (1 - incl) / nq)).all(), (ch.mean(0), incl)
    ch1 = _s("sampled", np.tile(s, (nq, 1)), np.ones((nq, 4), bool), 1, 10, ids, "softmax", T)
    assert (np.abs(ch1.mean(0) - p) < 4 * np.sqrt(p * (1 - p) / nq)).all()


def test_sampling_does_not_depend_on_the_teachers_score_scale():
    """Same draws for cosine-like scores and the same ranking on a BM25-like scale (affine map)."""
    rng = np.random.default_rng(0)
    nq, k = 300, 20
    cos = -np.sort(-rng.uniform(-0.2, 0.9, size=(nq, k)), axis=1).astype(np.float32)
    bm25 = (cos * 40 + 12).astype(np.float32)
    keep = rng.random((nq, k)) < 0.8
    ids = [f"q{i}" for i in range(nq)]
    for mode in ("sampled", "top1_sampled"):
        for w in ("uniform", "softmax"):
            assert (_s(mode, cos, keep, 4, 10, ids, w) == _s(mode, bm25, keep, 4, 10, ids, w)).all()


def test_per_teacher_streams():
    nq, k = 2000, 10
    scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (nq, 1))
    keep = np.ones((nq, k), bool)
    ids = [f"q{i}" for i in range(nq)]
    a = _s("sampled", scores, keep, 3, 10, ids, teacher="A")
    assert (a == _s("sampled", scores, keep, 3, 10, ids, teacher="A")).all()  # reproducible
    b = _s("sampled", scores, keep, 3, 10, ids, teacher="B")
    same = (a == b).all(axis=1).mean()
    assert same < 0.03  # independent streams: P(same 3-subset of 10) = 1/120
    # the stream seed is splitmix64(query seed XOR splitmix64(FNV-1a-64(teacher)))
    q = S.query_seeds(1, ids[:3])
    assert (S.teacher_seeds(q, "A") == S.splitmix64(q ^ S.splitmix64(S.fnv1a64(["A"]))[0])).all()
    assert (_s("sampled", scores, keep, 3, 10, ids, teacher="A", seed=2) != a).any(axis=1).mean() > 0.9


@st.composite
def ragged(draw):
    nq = draw(st.integers(1, 8))
    rows = []
    for i in range(nq):
        k = draw(st.integers(0, 15))
        sc = sorted(draw(st.lists(st.floats(-3, 3, width=32), min_size=k, max_size=k)), reverse=True)
        kp = draw(st.lists(st.booleans(), min_size=k, max_size=k))
        rows.append((f"id{draw(st.integers(0, 10**6))}-{i}", sc, kp))
    return rows


def _run(c, rows, width):
    scores = np.full((len(rows), width), -np.inf, np.float32)
    keep = np.zeros((len(rows), width), bool)
    for i, (_, sc, kp) in enumerate(rows):
        scores[i, : len(sc)] = sc
        keep[i, : len(kp)] = kp
    ch = S.sample(c, scores, keep, [r[0] for r in rows], "teacher")
    return [np.nonzero(ch[i])[0].tolist() for i in range(len(rows))]


@settings(max_examples=80, deadline=None)
@given(ragged(), st.sampled_from(["top", "sampled", "top1_sampled"]), st.integers(1, 5), st.integers(1, 8),
       st.integers(1, 4), st.sampled_from(["uniform", "softmax"]))
def test_property_independent_of_batching(rows, mode, n, k, split, weighting):
    c = cfg(sampling=mode, num_negatives=n, sample_top_k=k, seed=3, sample_weighting=weighting)
    maxk = max(len(r[1]) for r in rows)
    full = _run(c, rows, maxk)
    padded = _run(c, rows, maxk + 7)  # another batch makes the padded width differ
    pieces = [x for j in range(0, len(rows), split)
              for x in _run(c, rows[j: j + split], max(len(r[1]) for r in rows[j: j + split]))]
    assert full == padded == pieces
    for (_qid, _sc, kp), chosen in zip(rows, full, strict=False):
        kept = [j for j, b in enumerate(kp) if b]
        pool = kept if mode == "top" else kept[:k]
        assert set(chosen) <= set(kept) and len(chosen) == min(n, len(pool))  # never padded, never short of pool
        if mode == "top":
            assert chosen == kept[:n]
        else:
            assert set(chosen) <= set(kept[:k])
        if mode == "top1_sampled" and kept:
            assert kept[0] in chosen
