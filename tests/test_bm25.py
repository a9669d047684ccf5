"""BM25 teacher: hand-computed lucene scores, agreement with bm25s's own retrieve, exact ceiling search;
sharded BM25 (corpus-wide statistics) against one bm25s index over the whole corpus."""
from __future__ import annotations

import gzip
import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.bm25 import (
    METHODS,
    BM25Teacher,
    ShardedBM25,
    build_shard_matrix,
    count_terms,
    nonoccurrence,
    query_scores,
    sum_counts,
    tokenize,
    top_k_rows,
)
from raymine.columns import DOC_ID, PASSAGE, TEXT, TITLE
from raymine.config import SearchConfig, TeacherConfig

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


def test_search_orders_ties_by_id_and_pads_missing():
    t = tiny_teacher()
    ids, scores = t.search(["banana cherry", "zebra", "egg"], k=4)
    # d1 and d4 have identical text: tie, smaller id first
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
        want_ids = [teacher.doc_ids[i] for i in order] + [""] * (k - len(order))  # rows in doc-id order
        assert got_ids[q].tolist() == want_ids
        np.testing.assert_array_equal(got_scores[q][: len(order)], s[order])
        assert np.all(got_scores[q] < ceilings[q])


def test_score_lists_and_errors(scifact):
    teacher, ids, texts, queries = scifact
    got = teacher.score(queries[:2], [[ids[5], ids[0], ids[5]], []])
    full = bm25s_reference(texts, "lucene")(tokenize(queries[:1], "en")[0])  # independent: bm25s, input rows
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


def test_ties_break_by_id_whatever_the_input_order():
    t = BM25Teacher(TeacherConfig(kind="bm25", bm25_stopwords=""))
    t.index(["z9", "a1", "m5"], ["banana cherry", "banana cherry", "banana"])  # z9, a1 tie
    ids, _ = t.search(["banana cherry"], k=3)
    assert ids[0].tolist() == ["a1", "z9", "m5"]
    assert t.score(["banana cherry"], [["z9", "a1"]])[0][0] == t.score(["banana cherry"], [["a1"]])[0][0]


# --- sharded BM25: corpus-wide statistics, scores equal to one bm25s index ----------------------
def bm25s_reference(texts: list[str], method: str, k1: float = 1.5, b: float = 0.75, stopwords="en"):
    """One bm25s index over the whole corpus; returns a function tokens -> scores [n] (row order)."""
    import bm25s

    ref = bm25s.BM25(k1=k1, b=b, method=method)
    ref.index(bm25s.tokenize(texts, stopwords=stopwords or None, show_progress=False), show_progress=False)
    return lambda toks: np.asarray(ref.get_scores_from_ids(ref.get_tokens_ids(toks)), np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_shard_scores_from_global_stats_equal_bm25s(scifact, method):
    """Pure maths, no Ray: every split (uneven, an empty shard, a 1-doc shard) scores bit for bit as bm25s."""
    _, _, texts, queries = scifact
    score = bm25s_reference(texts, method, k1=1.2, b=0.6)
    toks = tokenize(texts, "en")
    qtoks = tokenize(queries, "en")
    want = np.stack([score(q) for q in qtoks])  # [nq, n]
    for sizes in [(1500,), (700, 0, 800), (1, 1499), (300, 301, 299, 600)]:
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = [toks[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        stats = sum_counts(count_terms(p) for p in parts)
        assert stats.num_docs == 1500 and stats.total_len == sum(map(len, toks))
        mats = [build_shard_matrix(p, stats, 1.2, 0.6, method) for p in parts]
        nonocc = ({t: nonoccurrence(d, stats, 1.2, 0.6, method) for t, d in stats.df.items()}
                  if method in ("bm25l", "bm25+") else None)
        got = np.stack([np.concatenate([query_scores(m, q, nonocc) for m in mats]) for q in qtoks])
        np.testing.assert_array_equal(got, want)
    assert (want > 0).sum() > 1000


def test_sum_counts_and_bad_stats():
    a, b = count_terms([["x", "y", "x"], []]), count_terms([["y"]])
    stats = sum_counts([a, b])
    assert stats.df == {"x": 1, "y": 2} and stats.num_docs == 3 and stats.total_len == 4
    with pytest.raises(ValueError, match="missing from the corpus statistics"):
        build_shard_matrix([["zzz"]], stats, 1.5, 0.75, "lucene")
    with pytest.raises(ValueError, match="bm25_method"):
        build_shard_matrix([["x"]], stats, 1.5, 0.75, "bm26")


def write_corpus(folder: Path, ids: list[str], texts: list[str], splits=(0.4, 0.45, 1.0), passage=True,
                 row_group=None) -> str:
    """A corpus as several Parquet files (the ingest layout: PASSAGE, or TITLE/TEXT without it)."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0] + [int(len(ids) * s) for s in splits]
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        cols = {DOC_ID: ids[lo:hi]}
        if passage:
            cols |= {PASSAGE: texts[lo:hi], TEXT: ["unused"] * (hi - lo)}
        else:  # title + " " + text = the passage (passage_text)
            cols |= {TITLE: [t.split(" ", 1)[0] for t in texts[lo:hi]],
                     TEXT: [t.split(" ", 1)[1] if " " in t else "" for t in texts[lo:hi]]}
        pq.write_table(pa.table(cols), folder / f"part-{f:05d}.parquet", row_group_size=row_group)
    return str(folder)


def reference_topk(full: np.ndarray, ids: np.ndarray, k: int, ceiling: float) -> tuple[list[str], np.ndarray]:
    """Independent top-k: candidates 0 < score < ceiling, score descending, ties by id string."""
    keep = np.flatnonzero((full > 0) & (full < ceiling))
    order = sorted(keep.tolist(), key=lambda r: (-full[r], ids[r]))[:k]
    return [ids[r] for r in order], full[order]


@pytest.fixture(scope="module")
def shuffled_corpus(scifact, tmp_path_factory):
    """SciFact's first 1500 docs in a shuffled row order, with duplicated texts (ties) under other ids."""
    _, ids, texts, queries = scifact
    rng = np.random.default_rng(0)
    ids = list(ids) + [f"dup-{i}" for i in range(40)]
    texts = list(texts) + [texts[i] for i in range(0, 400, 10)]  # twins: tied scores, broken by id
    perm = rng.permutation(len(ids))
    ids = [ids[i] for i in perm]
    texts = [texts[i] for i in perm]
    return ids, texts, queries, tmp_path_factory.mktemp("bm25corpus")


@pytest.mark.parametrize("shards,passage", [(1, True), (3, True), (4, False)])
def test_sharded_bm25_equals_single_index(ray_local, shuffled_corpus, shards, passage):
    ids, texts, queries, tmp = shuffled_corpus
    n = len(ids)
    uri = write_corpus(tmp / f"c{shards}{passage}", ids, texts, passage=passage, row_group=200)
    shard_rows = {1: [n], 3: [0, 17, n - 17], 4: [600, 1, 0, n - 601]}[shards]  # uneven, an empty shard
    score = bm25s_reference(texts, "lucene")
    full = np.stack([score(q) for q in tokenize(queries, "en")])  # [nq, n], rows = input order
    id_arr = np.array(ids, object)
    rng = np.random.default_rng(shards)
    ceil = np.array([np.sort(f[f > 0])[::-1][min(int(rng.integers(0, 15)), int((f > 0).sum()) - 1)]
                     if (f > 0).any() else 1.0 for f in full], np.float32)
    ceil[::4] = np.inf
    cfg = SearchConfig(num_shards=shards)
    with ShardedBM25.from_parquet(uri, TeacherConfig(kind="bm25"), cfg, shard_rows=shard_rows) as index:
        assert index.num_docs == n and index.exact and [i["num_docs"] for i in index.infos] == shard_rows
        for k, c in [(10, None), (30, ceil), (n + 3, ceil)]:
            s, got, above, short = index.search_batch(queries, k, c)
            assert s.shape == got.shape == (len(queries), k) and s.dtype == np.float32 and short == 0
            for q in range(len(queries)):
                cq = np.inf if c is None else float(c[q])
                want_ids, want_s = reference_topk(full[q], id_arr, k, cq)
                assert got[q].tolist() == want_ids + [""] * (k - len(want_ids))
                np.testing.assert_array_equal(s[q, : len(want_ids)], want_s)
                assert np.isneginf(s[q, len(want_ids):]).all()
                assert above[q] == (0 if np.isposinf(cq) else int((full[q] >= cq).sum()))
        # ties really occur here (twin texts), so the id rule is exercised
        assert any(len(set(s[q][np.isfinite(s[q])])) < np.isfinite(s[q]).sum() for q in range(len(queries)))
        # positive scores: exact, NaN for an unknown id
        lists = [[ids[3], "nope", ids[n - 1]], []] + [[ids[q]] for q in range(2, len(queries))]
        got = index.lookup_scores(queries, lists)
        np.testing.assert_array_equal(got[0], [full[0, 3], np.nan, full[0, n - 1]])
        assert got[1].shape == (0,) and all(g[0] == full[q, q] for q, g in enumerate(got) if q >= 2)
        with pytest.raises(ValueError, match="ceilings"):
            index.search_batch(queries[:2], 3, np.array([1.0]))
        # the client pickles into Ray tasks (actor handles + metadata) and answers the same there
        import ray

        task = ray.remote(lambda ix, t, c: ix.search_batch(t, 30, c)).options(num_cpus=0.25)
        in_task = ray.get(task.remote(index, queries, ceil))
        direct = index.search_batch(queries, 30, ceil)
        np.testing.assert_array_equal(in_task[0], direct[0])
        np.testing.assert_array_equal(in_task[1], direct[1])
        np.testing.assert_array_equal(in_task[2], direct[2])


def test_sharded_bm25_bad_input(ray_local, tmp_path):
    cfg = SearchConfig(num_shards=2)
    uri = write_corpus(tmp_path / "dup", ["a", "b", "a"], ["x y", "y z", "z w"], splits=(1.0,))
    with pytest.raises(Exception, match="duplicate doc id 'a'"):
        ShardedBM25.from_parquet(uri, TeacherConfig(kind="bm25"), SearchConfig(num_shards=1))
    uri = write_corpus(tmp_path / "empty", ["a", "b"], ["x y", "  "], splits=(1.0,))
    with pytest.raises(Exception, match="empty/null texts"):
        ShardedBM25.from_parquet(uri, TeacherConfig(kind="bm25"), cfg)
    pq.write_table(pa.table({DOC_ID: ["a"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing"):
        ShardedBM25.from_parquet(str(tmp_path / "bad.parquet"), TeacherConfig(kind="bm25"), cfg)
    with pytest.raises(ValueError, match="kind 'bm25'"):
        ShardedBM25.from_parquet(uri, TeacherConfig(), cfg)
