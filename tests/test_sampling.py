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


def test_sampled_only_from_first_k_kept_and_top1_always_first():
    nq, k = 500, 12
    keep = np.ones((nq, k), bool)
    keep[:, [0, 3]] = False  # kept ranks: cols 1,2,4,5,6,...
    scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (nq, 1))
    seeds = S.query_seeds(1, [f"q{i}" for i in range(nq)])
    ch = S.sampled(scores, keep, 3, 5, 1.0, seeds)  # first 5 kept = cols 1,2,4,5,6
    assert (ch.sum(1) == 3).all() and not ch[:, [0, 3, 7, 8, 9, 10, 11]].any()
    assert ch[:, [1, 2, 4, 5, 6]].all(axis=0).sum() == 0 and ch[:, [1, 2, 4, 5, 6]].any(axis=0).all()
    t1 = S.top1_sampled(scores, keep, 3, 5, 1.0, seeds)
    assert t1[:, 1].all() and (t1.sum(1) == 3).all() and not t1[:, [0, 3, 7, 8, 9, 10, 11]].any()
    # n >= eligible: everything eligible; temperature -> 0: the top n
    assert (S.sampled(scores, keep, 9, 5, 1.0, seeds) == (keep & (S.kept_rank(keep) < 5))).all()
    assert (S.sampled(scores, keep, 3, 5, 1e-4, seeds) == S.top(keep, 3)).all()
    # short lists: fewer than n kept -> all of them, no padding
    short = np.zeros((nq, k), bool)
    short[:, 5] = True
    assert (S.top1_sampled(scores, short, 4, 10, 1.0, seeds) == short).all()


def test_sampled_follows_softmax_without_replacement():
    """Inclusion probabilities of 2 draws without replacement, p = softmax(s / T), hand-derived."""
    nq = 40_000
    s = np.array([1.0, 0.5, 0.0, -1.0], np.float32)
    T = 0.5
    p = np.exp(s / T) / np.exp(s / T).sum()
    # P(i in sample of 2) = p_i + sum_{j != i} p_j * p_i / (1 - p_j)
    incl = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)])
    seeds = S.query_seeds(5, [f"query-{i}" for i in range(nq)])
    ch = S.sampled(np.tile(s, (nq, 1)), np.ones((nq, 4), bool), 2, 10, T, seeds)
    freq = ch.mean(0)
    tol = 4 * np.sqrt(incl * (1 - incl) / nq)
    assert (np.abs(freq - incl) < tol).all(), (freq, incl)
    # n = 1: first-draw law is the softmax itself
    ch1 = S.sampled(np.tile(s, (nq, 1)), np.ones((nq, 4), bool), 1, 10, T, seeds)
    assert (np.abs(ch1.mean(0) - p) < 4 * np.sqrt(p * (1 - p) / nq)).all()


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
    ch = S.sample(c, scores, keep, [r[0] for r in rows])
    return [np.nonzero(ch[i])[0].tolist() for i in range(len(rows))]


@settings(max_examples=80, deadline=None)
@given(ragged(), st.sampled_from(["top", "sampled", "top1_sampled"]), st.integers(1, 5), st.integers(1, 8),
       st.integers(1, 4))
def test_property_independent_of_batching(rows, mode, n, k, split):
    c = cfg(sampling=mode, num_negatives=n, sample_top_k=k, seed=3)
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
