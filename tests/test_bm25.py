"""BM25 teacher: hand-computed lucene scores, agreement with bm25s's own retrieve, exact ceiling search;
sharded BM25 (corpus-wide statistics from a distributed count + reduce, sparse scoring) against one bm25s
index over the whole corpus, and the sparse scoring against a dense reference kept here."""
from __future__ import annotations

import gzip
import json
import math
import pickle
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.bm25 import (
    METHODS,
    BM25Teacher,
    CorpusStats,
    ShardedBM25,
    ShardMatrix,
    build_shard_matrix,
    count_terms,
    nonoccurrence,
    reduce_partition,
    shard_stats,
    sparse_scores,
    sparse_top_k,
    term_partition,
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


def distributed_stats(parts: list[list[list[str]]], num_parts: int) -> tuple[list[CorpusStats], int]:
    """Steps 1–2 without Ray: count each shard into ``num_parts`` term partitions, reduce each partition,
    give each shard its tables → (each shard's statistics, vocabulary size)."""
    counts = [count_terms(p, num_parts) for p in parts]
    reduced = [reduce_partition([c.parts[q] for c in counts]) for q in range(num_parts)]  # [P] (v_q, [S])
    n, total = sum(c.num_docs for c in counts), sum(c.total_len for c in counts)
    return [shard_stats(n, total, [r[1][s] for r in reduced]) for s in range(len(parts))], sum(r[0] for r in reduced)


def dense_scores(m: ShardMatrix, tokens: list[str], extra: np.float32 | None) -> np.ndarray:
    """The dense reference (what the library did before): a float32 [n] accumulator, columns added in
    query-token order, then ``extra`` added to every row."""
    s = np.zeros(m.num_docs, np.float32)
    for t in tokens:
        if (c := m.vocab.get(t)) is not None:
            s[m.rows[m.indptr[c]:m.indptr[c + 1]]] += m.data[m.indptr[c]:m.indptr[c + 1]]
    if extra is not None:
        s += np.float32(extra)
    return s


def densify(rows: np.ndarray, scores: np.ndarray, rest: np.float32, n: int) -> np.ndarray:
    out = np.full(n, rest, np.float32)
    out[rows] = scores
    return out


def global_extra(stats: list[CorpusStats], tokens: list[str], method: str, k1: float, b: float) -> np.float32 | None:
    """BM25L/BM25+: the float32 sum of the query tokens' non-occurrence scores, each from a shard that
    holds the term (what the client gathers from the actors)."""
    if method not in ("bm25l", "bm25+"):
        return None
    vals = []
    for t in tokens:
        holder = next((st for st in stats if t in st.df), None)
        if holder is not None:
            vals.append(nonoccurrence(holder.df[t], holder, k1, b, method))
    return np.array(vals, np.float32).sum()


@pytest.mark.parametrize("method", METHODS)
def test_shard_scores_from_global_stats_equal_bm25s(scifact, method):
    """Pure maths, no Ray: every split (uneven, an empty shard, a 1-doc shard) and number of term
    partitions scores bit for bit as bm25s, though no shard sees the whole vocabulary."""
    _, _, texts, queries = scifact
    score = bm25s_reference(texts, method, k1=1.2, b=0.6)
    toks = tokenize(texts, "en")
    qtoks = tokenize(queries, "en")
    want = np.stack([score(q) for q in qtoks])  # [nq, n]
    vocab = len({t for d in toks for t in d})
    for sizes, num_parts in [((1500,), 1), ((700, 0, 800), 3), ((1, 1499), 2), ((300, 301, 299, 600), 4)]:
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = [toks[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        stats, v = distributed_stats(parts, num_parts)
        assert v == vocab and all(st.num_docs == 1500 and st.total_len == sum(map(len, toks)) for st in stats)
        assert all(set(st.df) == {t for d in p for t in d} for st, p in zip(stats, parts, strict=True))  # own terms
        mats = [build_shard_matrix(p, st, 1.2, 0.6, method) for p, st in zip(parts, stats, strict=True)]
        got = np.stack([np.concatenate([densify(*sparse_scores(m, q, global_extra(stats, q, method, 1.2, 0.6)),
                                                m.num_docs) for m in mats]) for q in qtoks])
        np.testing.assert_array_equal(got, want)
    assert (want > 0).sum() > 1000


def test_counts_reduce_and_bad_stats():
    a, b = count_terms([["x", "y", "x"], []], 2), count_terms([["y"], ["z", "y"]], 2)
    assert (a.num_docs, a.total_len, b.num_docs, b.total_len) == (2, 3, 2, 3)
    part = dict(zip(["x", "y", "z"], term_partition(["x", "y", "z"], 2).tolist(), strict=True))
    for c, local in [(a, {"x": 1, "y": 1}), (b, {"y": 2, "z": 1})]:  # each term in its hash partition
        for q in range(2):
            assert dict(zip(*c.parts[q].to_pydict().values(), strict=True)) == {t: d for t, d in local.items()
                                                                                 if part[t] == q}
    reduced = [reduce_partition([a.parts[q], b.parts[q]]) for q in range(2)]
    assert sum(v for v, _ in reduced) == 3
    sa, sb = (shard_stats(4, 6, [r[1][s] for r in reduced]) for s in range(2))
    assert sa.df == {"x": 1, "y": 3} and sb.df == {"y": 3, "z": 1} and sa.avgdl == 1.5  # global df, own terms
    assert term_partition(["x", "y", "z"], 2).tolist() == term_partition(["x", "y", "z"], 2).tolist()
    with pytest.raises(ValueError, match="missing from the corpus statistics"):
        build_shard_matrix([["zzz"]], sa, 1.5, 0.75, "lucene")
    with pytest.raises(ValueError, match="bm25_method"):
        build_shard_matrix([["x"]], sa, 1.5, 0.75, "bm26")
    with pytest.raises(ValueError, match="num_parts"):
        count_terms([["x"]], 0)


def random_matrix(rng: np.random.Generator, n: int, v: int) -> ShardMatrix:
    """A hand-made shard matrix, most columns with coarse values (-0.5 … 1, zeros included: ties
    everywhere, touched rows that score exactly the untouched constant), some with arbitrary float32
    values (where the order and precision of the float32 sums show)."""
    rows, data, indptr = [], [], [0]
    for _ in range(v):
        r = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False)).astype(np.int32)
        rows.append(r)
        coarse = rng.choice(np.array([-0.5, 0.0, 0.25, 0.5, 1.0], np.float32), size=r.size)
        data.append(coarse if rng.random() < 0.6 else rng.uniform(0, 3, r.size).astype(np.float32))  # rounding
        indptr.append(indptr[-1] + r.size)
    return ShardMatrix({f"t{c}": c for c in range(v)}, np.array(indptr, np.int64), np.concatenate(rows),
                       np.concatenate(data), n)


def reference_rows(dense: np.ndarray, k: int, ceiling: float) -> list[int]:
    """Independent: rows with 0 < score < ceiling, score descending, ties by row."""
    return sorted((i for i in range(dense.size) if 0 < dense[i] < ceiling), key=lambda i: (-dense[i], i))[:k]


@pytest.mark.parametrize("dense_fraction", [0.0, np.inf])  # every query on the dense buffer / on the sort
def test_sparse_scoring_equals_dense_reference(monkeypatch, dense_fraction):
    """Sparse accumulate + top-k over the touched rows == the dense vector's, on random matrices (ties,
    ceilings at existing scores and at the untouched constant, k beyond the touched rows, repeated and
    unknown tokens, a constant for untouched rows as BM25L/BM25+ give), through both accumulators."""
    from raymine import bm25

    monkeypatch.setattr(bm25, "DENSE_FRACTION", dense_fraction)
    rng = np.random.default_rng(7)
    checked = with_rest = 0
    for trial in range(60):
        n, v = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        m = random_matrix(rng, n, v)
        for _ in range(4):
            toks = [f"t{int(c)}" for c in rng.integers(0, v + 2, size=int(rng.integers(0, 6)))]  # t{v}+: unknown
            extra = None if trial % 3 == 0 else np.float32(rng.choice([0.0, 0.25, 0.5, -0.25]))
            dense = dense_scores(m, toks, extra)  # [n]
            rows, sc, rest = sparse_scores(m, toks, extra)
            assert rows.dtype == np.int64 and sc.dtype == np.float32 and np.all(np.diff(rows) > 0)
            np.testing.assert_array_equal(densify(rows, sc, rest, n), dense)  # bit for bit
            posted = {r for t in toks if t in m.vocab for r in m.rows[m.indptr[m.vocab[t]]:m.indptr[m.vocab[t] + 1]]}
            nonzero = set(np.flatnonzero(dense_scores(m, toks, None)).tolist())  # term sum != 0
            assert nonzero <= set(rows.tolist()) <= posted  # only posting-list rows; every one that scores
            levels = np.unique(dense)
            for ceiling in [np.inf, float(rest), float(rest) + 0.1, *rng.choice(levels, size=2).tolist(), -1.0]:
                for k in [0, 1, 3, max(rows.size, 1) + 2, n, n + 5]:
                    got, got_s, above = sparse_top_k(rows, sc, rest, n, k, ceiling)
                    want = reference_rows(dense, k, ceiling)
                    assert got.tolist() == want, (trial, toks, ceiling, k)
                    np.testing.assert_array_equal(got_s, dense[want])
                    assert above == (0 if np.isposinf(ceiling) else int((dense >= ceiling).sum()))
                    checked += 1
                    with_rest += int(rest > 0 and any(r not in rows for r in want))
    assert checked > 5000 and with_rest > 100  # untouched rows really were chosen
    with pytest.raises(ValueError, match="NaN"):
        sparse_top_k(np.zeros(0, np.int64), np.zeros(0, np.float32), np.float32(0), 3, 2, float("nan"))


def test_sparse_scoring_cost_follows_posting_lists():
    """A query touching 3 rows of a 200k-row shard returns 3 rows, and the top-k with k=5 beyond them
    only the 5 lowest untouched rows: nothing shard-sized is built."""
    n = 200_000
    m = ShardMatrix({"a": 0, "b": 1}, np.array([0, 2, 3], np.int64), np.array([7, 150_000, 7], np.int32),
                    np.array([1.0, 2.0, 0.5], np.float32), n)
    rows, sc, rest = sparse_scores(m, ["b", "a", "zz"], np.float32(0.25))
    assert rows.tolist() == [7, 150_000] and sc.tolist() == [1.75, 2.25] and rest == np.float32(0.25)
    got, got_s, above = sparse_top_k(rows, sc, rest, n, 5, 2.0)
    assert got.tolist() == [7, 0, 1, 2, 3] and got_s.tolist() == [1.75] + [0.25] * 4 and above == 1
    got, _, above = sparse_top_k(rows, sc, rest, n, 5, 0.25)  # the constant is at the ceiling: excluded
    assert got.tolist() == [] and above == n


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


def vocab_corpus(rng: np.random.Generator, n: int, vocab: int) -> tuple[list[str], list[str]]:
    """n docs over ``vocab`` words, the word 'rareword' in one doc only, twin texts (ties)."""
    words = [f"w{i}x" for i in range(vocab)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(n)]
    texts[-1] += " rareword"
    texts[:10] = texts[10:20]
    return [f"doc{i:04d}" for i in range(n)], texts


def test_sharded_bm25_driver_holds_scalars_and_bm25plus_equals_bm25s(ray_local, tmp_path):
    """BM25+ through Ray (a query term only the last shard holds still adds its non-occurrence score in
    every shard) equals one bm25s index, search (k beyond the touched docs) and lookup; the driver keeps
    scalars and object refs only: the client's pickled size does not grow with a 40× larger vocabulary."""
    import ray

    rng = np.random.default_rng(3)
    tcfg = TeacherConfig(kind="bm25", bm25_stopwords="", bm25_method="bm25+")
    sizes = []
    for vocab in (50, 2000):
        ids, texts = vocab_corpus(rng, 240, vocab)
        uri = write_corpus(tmp_path / f"v{vocab}", ids, texts)
        score = bm25s_reference(texts, "bm25+", stopwords="")
        queries = ["w1x w2x rareword", "rareword", "w3x w3x w4x", "nothing matches"]
        full = np.stack([score(q) for q in tokenize(queries, "")])  # [nq, n]
        with ShardedBM25.from_parquet(uri, tcfg, SearchConfig(num_shards=2)) as index:
            assert index.stats == {"num_docs": 240, "total_len": sum(len(t.split()) for t in texts),
                                   "vocab_size": len({w for t in texts for w in t.split()})}
            assert all(type(x) is int for x in index.stats.values())
            assert all(isinstance(r, ray.ObjectRef) for refs in index._keep for r in refs)  # not materialised
            sizes.append(len(pickle.dumps(index)))
            ceil = np.array([np.inf, np.inf, np.sort(full[2])[-3], np.inf], np.float32)
            s, got, above, _ = index.search_batch(queries, 250, ceil)
            id_arr = np.array(ids, object)
            for q in range(len(queries)):
                want_ids, want_s = reference_topk(full[q], id_arr, 250, float(ceil[q]))
                assert got[q].tolist() == want_ids + [""] * (250 - len(want_ids))
                np.testing.assert_array_equal(s[q, : len(want_ids)], want_s)
                assert above[q] == (0 if np.isposinf(ceil[q]) else int((full[q] >= ceil[q]).sum()))
            assert len(reference_topk(full[1], id_arr, 250, np.inf)[0]) == 240  # untouched docs score too
            got = index.lookup_scores(queries[:2], [[ids[0], ids[-1], "nope"], [ids[5]]])
            np.testing.assert_array_equal(got[0], [full[0, 0], full[0, -1], np.nan])
            np.testing.assert_array_equal(got[1], [full[1, 5]])
    assert abs(sizes[0] - sizes[1]) < 64, sizes
