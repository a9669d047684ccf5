"""BM25 teacher: hand-computed lucene scores, agreement with bm25s's own retrieve, exact ceiling search."""
from __future__ import annotations

import gzip
import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from raymine.bm25 import BM25Teacher, top_k_rows
from raymine.config import TeacherConfig

SCIFACT = Path(__file__).resolve().parents[1] / "data" / "scifact"
TINY = ["apple banana apple", "banana cherry", "cherry cherry cherry date", "egg", "banana cherry"]


def tiny_teacher(**kw) -> BM25Teacher:
    t = BM25Teacher(TeacherConfig(kind="bm25", bm25_stopwords="", **kw))
    t.index([f"d{i}" for i in range(len(TINY))], TINY)
    return t


def lucene(query: str, row: int, k1: float = 1.5, b: float = 0.75) -> float:
    """BM25 (lucene variant) from its definition: sum over query terms of idf * tf / (tf + k1 (1 - b + b dl/avgdl))."""
    docs = [d.split() for d in TINY]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    total = 0.0
    for w in query.split():
        df = sum(w in d for d in docs)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        tf = docs[row].count(w)
        total += idf * tf / (tf + k1 * (1 - b + b * len(docs[row]) / avgdl))
    return total


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4)])
def test_scores_match_the_lucene_definition(k1, b):
    t = tiny_teacher(bm25_k1=k1, bm25_b=b)
    for q in ["apple banana", "cherry date", "banana egg zebra"]:
        got = t.score([q], [[f"d{i}" for i in range(len(TINY))]])[0]
        want = [lucene(q, i, k1, b) for i in range(len(TINY))]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_search_orders_ties_by_row_and_pads_missing():
    t = tiny_teacher()
    ids, scores = t.search(["banana cherry", "zebra", "egg"], k=4)
    # d1 and d4 have identical text: tie, lower row first
    assert ids[0].tolist()[:2] == ["d1", "d4"] and scores[0, 0] == scores[0, 1]
    assert np.all(np.diff(scores[0][np.isfinite(scores[0])]) <= 0)
    # zero-overlap docs are not candidates: "" and -inf fill the rest
    assert ids[1].tolist() == ["", "", "", ""] and np.all(scores[1] == -np.inf)
    assert ids[2].tolist() == ["d3", "", "", ""] and scores[2, 0] > 0 and np.all(scores[2, 1:] == -np.inf)
    assert ids.dtype == object and scores.dtype == np.float32 and ids.shape == scores.shape == (3, 4)


def test_ceiling_is_strict_and_exact_on_tiny():
    t = tiny_teacher()
    full = t.score(["banana cherry"], [[f"d{i}" for i in range(5)]])[0]
    ids, scores = t.search(["banana cherry"], k=5, ceilings=np.array([full[1]]))  # d1/d4's score
    assert "d1" not in ids[0] and "d4" not in ids[0]
    assert np.all(scores[0][np.isfinite(scores[0])] < full[1])


@pytest.mark.parametrize("n,k", [(0, 3), (5, 0), (5, 3), (5, 10), (8, 8)])
def test_top_k_rows_every_size(n, k):
    rng = np.random.default_rng(n * 10 + k)
    scores = rng.integers(0, 4, size=n).astype(np.float32)  # many ties and zeros
    for ceiling in [np.inf, 2.0, 0.5]:
        got = top_k_rows(scores, k, ceiling)
        keep = [i for i in range(n) if 0 < scores[i] < ceiling]
        want = sorted(keep, key=lambda i: (-scores[i], i))[:k]
        assert got.tolist() == want
    with pytest.raises(ValueError, match="NaN"):
        top_k_rows(scores, k, float("nan"))


# --- on real text: SciFact ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scifact():
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in islice(f, 1500)]
    with gzip.open(SCIFACT / "queries.jsonl.gz", "rt") as f:
        queries = [json.loads(line)["text"] for line in islice(f, 40)]
    ids = [d["_id"] for d in docs]
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    teacher = BM25Teacher(TeacherConfig(kind="bm25"))
    teacher.index(ids, texts)
    return teacher, ids, texts, queries


def test_top_results_agree_with_bm25s_retrieve(scifact):
    import bm25s

    teacher, ids, texts, queries = scifact
    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    ref_rows, ref_scores = ref.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                        k=10, show_progress=False)
    got_ids, got_scores = teacher.search(queries, k=10)
    compared = 0
    for q in range(len(queries)):
        pos = ref_scores[q] > 0
        np.testing.assert_allclose(got_scores[q][pos], ref_scores[q][pos], rtol=1e-6)
        # same docs wherever the score is not tied with a neighbour
        for j in np.flatnonzero(pos):
            if np.sum(ref_scores[q] == ref_scores[q][j]) == 1:
                assert got_ids[q, j] == ids[ref_rows[q, j]]
                compared += 1
    assert compared > 200


def test_ceiling_search_equals_brute_force_mask(scifact):
    teacher, ids, _, queries = scifact
    rng = np.random.default_rng(0)
    full = [teacher.full_scores(toks) for toks in teacher.tokenize(queries)]  # [nq][n_docs]
    # ceilings at an existing score (tests strictness), between scores, and none
    ceilings = np.array([
        np.sort(s[s > 0])[::-1][min(int(rng.integers(0, 20)), int((s > 0).sum()) - 1)] if (s > 0).any() else 1.0
        for s in full
    ])
    ceilings[::5] = np.inf
    ceilings[1::5] += 0.013
    k = 25
    got_ids, got_scores = teacher.search(queries, k=k, ceilings=ceilings)
    # the same search also counts what the ceiling removed: every doc scoring >= the ceiling
    ids3, scores3, above = teacher.search(queries, k=k, ceilings=ceilings, return_above=True)
    assert ids3.tolist() == got_ids.tolist() and above.dtype == np.int64
    np.testing.assert_array_equal(above, [int((s >= c).sum()) for s, c in zip(full, ceilings, strict=True)])
    assert (above[::5] == 0).all() and (above > 0).sum() >= len(queries) // 2
    np.testing.assert_array_equal(teacher.search(queries[:3], k=2, return_above=True)[2], [0, 0, 0])
    for q, s in enumerate(full):
        masked = np.where((s > 0) & (s < ceilings[q]), s, -np.inf)
        order = np.lexsort((np.arange(len(s)), -masked))[:k]
        order = order[np.isfinite(masked[order])]
        want_ids = [ids[i] for i in order] + [""] * (k - len(order))
        assert got_ids[q].tolist() == want_ids
        np.testing.assert_array_equal(got_scores[q][: len(order)], s[order])
        assert np.all(got_scores[q] < ceilings[q])


def test_score_lists_and_errors(scifact):
    teacher, ids, _, queries = scifact
    got = teacher.score(queries[:2], [[ids[5], ids[0], ids[5]], []])
    full = teacher.full_scores(teacher.tokenize(queries[:1])[0])
    np.testing.assert_array_equal(got[0], full[[5, 0, 5]])
    assert got[1].shape == (0,) and got[0].dtype == np.float32
    with pytest.raises(KeyError, match="not in the BM25 index"):
        teacher.score(queries[:1], [["no-such-doc"]])
    with pytest.raises(ValueError, match="ceilings"):
        teacher.search(queries[:2], k=3, ceilings=np.array([1.0]))


def test_index_rejects_bad_corpus():
    t = BM25Teacher(TeacherConfig(kind="bm25"))
    with pytest.raises(RuntimeError, match="index"):
        t.search(["x"], 1)
    with pytest.raises(ValueError, match="duplicate doc id 'a'"):
        t.index(["a", "b", "a"], ["x y", "y z", "z w"])
    with pytest.raises(ValueError, match="'b' .*empty"):
        t.index(["a", "b"], ["x y", "  "])
    with pytest.raises(ValueError, match="kind 'bm25'"):
        BM25Teacher(TeacherConfig())
