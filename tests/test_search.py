"""Sharded search through real Ray actors against brute-force numpy: Flat over S in {1,2,3,5} with
uneven (and empty) shards, tie-heavy data, k larger than a shard, per-query ceilings; IVF recall and
deeper re-query; the search stage's table and manifest; the BM25 wrapper."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.columns import (
    ABOVE_CEILING,
    CANDIDATE_IDS,
    CANDIDATE_SCORES,
    CEILING,
    DOC_ID,
    EMBEDDING,
    EXCLUDED_IDS,
    POSITIVE_IDS,
    POSITIVE_SCORES,
    QUERY_ID,
    TEACHER,
    TEXT,
)
from raymine.config import SearchConfig
from raymine.index import ShardedIndex, embedding_layout, plan_shards
from raymine.search import SEARCH_SCHEMA, search_stage
from raymine.topk import brute_force_topk

N, D = 1203, 8


def write_embeddings(folder, ids, emb, id_col=DOC_ID, splits=(0.5, 1.0), row_group=None, fp16_files=()):
    """Write ``emb [n, d]`` as several Parquet files of fixed_size_list embeddings (the embed layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0] + [int(len(ids) * s) for s in splits]
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        dtype = np.float16 if f in fp16_files else np.float32
        flat = pa.array(np.ascontiguousarray(emb[lo:hi], dtype=dtype).reshape(-1))
        t = pa.table({id_col: pa.array(ids[lo:hi], pa.string()),
                      EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})
        pq.write_table(t, folder / f"part-{f:05d}.parquet", row_group_size=row_group)
    return str(folder)


@pytest.fixture(scope="module")
def tie_corpus(tmp_path_factory):
    """Small-integer vectors: exact float arithmetic in every backend, and ties everywhere."""
    rng = np.random.default_rng(0)
    emb = rng.integers(-2, 3, size=(N, D)).astype(np.float32)
    ids = np.array([f"doc-{i:05d}" for i in range(N)], dtype=object)
    uri = write_embeddings(tmp_path_factory.mktemp("tie"), ids, emb, splits=(0.3, 0.31, 1.0), row_group=97,
                           fp16_files=(1,))
    return uri, ids, emb


def assert_topk_equal(emb, queries, k, ceilings, got_s, got_ids, ids):
    """Tie-tolerant: the scores are the brute-force top-k scores, every id carries its true score, no repeats."""
    ref_s, _ = brute_force_topk(emb, queries, k, ceilings)
    np.testing.assert_array_equal(got_s, ref_s)
    row_of = {d: i for i, d in enumerate(ids)}
    full = queries @ emb.T  # [nq, N]
    for q in range(len(queries)):
        valid = got_ids[q] != ""
        assert (valid == np.isfinite(got_s[q])).all()
        rows = [row_of[d] for d in got_ids[q][valid]]
        assert len(set(rows)) == len(rows)
        np.testing.assert_array_equal(full[q, rows], got_s[q][valid])


UNEVEN = {1: [N], 2: [100, N - 100], 3: [0, 37, N - 37], 5: [5, 300, 1, 600, N - 906]}


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_sharded_flat_equals_brute_force(ray_local, tie_corpus, num_shards):
    uri, ids, emb = tie_corpus
    rng = np.random.default_rng(num_shards)
    queries = rng.integers(-2, 3, size=(13, D)).astype(np.float32)
    ceilings = rng.integers(-2, 6, size=13).astype(np.float32)
    ceilings[0] = np.inf
    ceilings[1] = -50.0  # nothing below
    cfg = SearchConfig(num_shards=num_shards)
    with ShardedIndex.from_parquet(uri, cfg, shard_rows=UNEVEN[num_shards]) as index:
        assert index.num_docs == N and index.dim == D
        assert [i["num_docs"] for i in index.infos] == UNEVEN[num_shards]
        for k in (1, 10, 350, N + 5):  # 350 > every shard but the largest
            for c in (None, ceilings):
                s, got = index.search(queries, k, c)
                assert s.shape == (13, k) and got.shape == (13, k) and s.dtype == np.float32
                assert_topk_equal(emb, queries, k, c, s, got, ids)
        # with a ceiling the exact masked scan also reproduces the stable-argsort order itself
        _, ref_i = brute_force_topk(emb, queries, 40, ceilings)
        np.testing.assert_array_equal(index.search(queries, 40, ceilings)[1],
                                      np.where(ref_i >= 0, ids[np.maximum(ref_i, 0)], ""))
        assert (index.search(queries, 5, ceilings)[1][1] == "").all()
        # what the ceiling removed inside the shards, summed over shards = brute-force count
        full = queries @ emb.T  # [nq, N], exact small integers
        want_above = (full >= ceilings[:, None]).sum(axis=1)
        assert want_above[0] == 0 and want_above[1] == N and want_above[2:].min() >= 0
        for k in (0, 7):
            index.search(queries, k, ceilings)
            np.testing.assert_array_equal(index.last_above_ceiling, want_above)
        index.search(queries, 7)
        np.testing.assert_array_equal(index.last_above_ceiling, np.zeros(13))
        # positive scores: exact inner products, NaN for an unknown id
        lists = [[ids[3], "nope", ids[N - 1]], [], [ids[500]]] + [[ids[7]]] * 10
        got = index.lookup_scores(queries, lists)
        np.testing.assert_array_equal(got[0], [queries[0] @ emb[3], np.nan, queries[0] @ emb[N - 1]])
        assert got[1].shape == (0,)
        assert got[2][0] == queries[2] @ emb[500]


def test_plan_and_layout(tie_corpus):
    uri, _, _ = tie_corpus
    dim, groups = embedding_layout(uri)
    assert dim == D and sum(n for *_, n in groups) == N
    plans = plan_shards(groups, UNEVEN[5])
    assert [sum(p.hi - p.lo for p in plan) for plan in plans] == UNEVEN[5]
    with pytest.raises(ValueError):
        plan_shards(groups, [1, 2])


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Synthetic clustered, L2-normalised data: 40 centres, d=32."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, 32))
    lab = rng.integers(0, 40, 4000)
    emb = centres[lab] + 0.35 * rng.standard_normal((4000, 32))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ql = rng.integers(0, 40, 200)
    q = centres[ql] + 0.35 * rng.standard_normal((200, 32))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"c{i}" for i in range(4000)], dtype=object)
    uri = write_embeddings(tmp_path_factory.mktemp("clustered"), ids, emb, splits=(0.25, 0.7, 1.0))
    return uri, ids, emb, q


def test_ivf_recall_and_deeper_ceiling_search(ray_local, clustered, tmp_path):
    uri, ids, emb, queries = clustered
    cfg = SearchConfig(num_shards=2, index_factory="IVF32,Flat", nprobe=32, train_sample=2000, max_depth=64,
                       recall_sample=150, query_batch_size=64)
    with ShardedIndex.from_parquet(uri, cfg) as index:
        assert not index.exact
        # nprobe = nlist: IVF,Flat is exhaustive, so ceiling search by re-querying deeper is exact
        full = queries @ emb.T
        srt = np.sort(full, axis=1)
        ceil = ((srt[:, -30] + srt[:, -31]) / 2).astype(np.float32)  # 30 docs above: needs k' >= 40 for k=10
        ceil[:5] = np.inf
        s, got = index.search(queries, 10, ceil)
        ref_s, ref_i = brute_force_topk(emb, queries, 10, ceil)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
        assert (got == ids[ref_i]).mean() > 0.99
        assert index.last_stats == {"short": 0, "deepest_k": 40}
        # re-queried to depth 40 with 30 docs over the ceiling: every one of them was seen
        np.testing.assert_array_equal(index.last_above_ceiling, (full >= ceil[:, None]).sum(axis=1))
        # ceilings below rank 100 cannot be reached at max_depth 64: reported short, not silently filled
        low = srt[:, -100].astype(np.float32)
        s, got = index.search(queries[:8], 10, low[:8])
        assert index.last_stats["short"] == 8 and (got == "").all()
        # 100 docs over the ceiling, only 64 seen at max_depth: a lower bound, as documented
        np.testing.assert_array_equal(index.last_above_ceiling, [64] * 8)
        assert ((full[:8] >= low[:8, None]).sum(axis=1) >= 100).all()

        index.set_nprobe(8)
        # recall reported by the stage, on the sampled queries, against exact sharded search
        qids = [f"q{i}" for i in range(len(queries))]
        quri = write_embeddings(tmp_path / "q", np.array(qids, object), queries, id_col=QUERY_ID)
        pos = pa.table({QUERY_ID: qids, POSITIVE_IDS: [[ids[int(np.argmax(r))]] for r in full],
                        EXCLUDED_IDS: [[] for _ in qids]})
        man = search_stage(quri, pos, index, lambda n: 10 + n, None, cfg, str(tmp_path / "out"), "ivf")
        assert set(man["recall"]) == {"recall@10", "recall@11"}
        assert man["recall"]["recall@10"] >= 0.9
        approx = index.search(queries, 10)[1]
        exact = index.search_exact(queries, 10)[1]
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]) >= 0.9


def test_search_stage_table_and_manifest(ray_local, tie_corpus, tmp_path):
    uri, ids, emb = tie_corpus
    rng = np.random.default_rng(11)
    nq = 70
    queries = rng.integers(-2, 3, size=(nq, D)).astype(np.float32)
    qids = [f"q{i}" for i in range(nq)]
    quri = write_embeddings(tmp_path / "q", np.array(qids, object), queries, id_col=QUERY_ID, splits=(0.4, 1.0))
    # positives: 1-3 per query; q0 has an unknown positive; q69 has no positives row (counted)
    pos_lists = [[ids[j] for j in rng.choice(N, 1 + i % 3, replace=False)] for i in range(nq - 1)]
    pos_lists[0] = pos_lists[0] + ["missing-doc"]
    exc_lists = [[ids[5]] if i % 4 == 0 else [] for i in range(nq - 1)]
    positives = pa.table({QUERY_ID: qids[:-1] + ["q-no-embedding"], POSITIVE_IDS: pos_lists + [["x"]],
                          EXCLUDED_IDS: exc_lists + [[]]})

    def ceiling_fn(scores):  # a stand-in for the mining rule: below the weakest positive
        return np.array([s.min() - 0.5 if s.size else np.inf for s in scores], np.float32)

    def depth_fn(n):
        return 20 + 3 * n

    cfg = SearchConfig(num_shards=3, query_batch_size=16)
    out = tmp_path / "out"
    with ShardedIndex.from_parquet(uri, cfg) as index:
        man = search_stage(quri, positives, index, depth_fn, ceiling_fn, cfg, str(out), "tie")
        table = pq.read_table(out)
        assert table.schema.equals(SEARCH_SCHEMA)
        assert man["counts"]["queries"] == nq - 1 == table.num_rows
        assert man["counts"]["queries_without_positives"] == 1
        assert man["counts"]["queries_without_embedding"] == 1
        assert man["counts"]["positives_not_found"] == 1
        assert man["counts"]["queries_with_positive_not_found"] == 1
        assert man["counts"]["above_ceiling"] == sum(table.column(ABOVE_CEILING).to_pylist())
        want_max = max(depth_fn(len(p) + len(e)) for p, e in zip(pos_lists, exc_lists, strict=True))
        assert man["depth"]["max"] == want_max and man["recall"] is None
        rows = {r[QUERY_ID]: r for r in table.to_pylist()}
        row_of = {d: i for i, d in enumerate(ids)}
        full = queries @ emb.T
        for i in range(nq - 1):
            r = rows[qids[i]]
            known = [row_of[d] for d in pos_lists[i] if d in row_of]
            np.testing.assert_array_equal(r[POSITIVE_SCORES][: len(known)], full[i, known])
            ceil = full[i, known].min() - 0.5
            assert r[CEILING] == pytest.approx(ceil) and r[TEACHER] == "tie"
            assert r[ABOVE_CEILING] == int((full[i] >= np.float32(r[CEILING])).sum())  # positives included
            assert r[EXCLUDED_IDS] == exc_lists[i]
            depth = depth_fn(len(pos_lists[i]) + len(exc_lists[i]))
            ref_s, ref_i = brute_force_topk(emb, queries[i : i + 1], depth, np.array([ceil]))
            want = ids[ref_i[0][ref_i[0] >= 0]].tolist()
            assert r[CANDIDATE_IDS] == want  # exact masked scan: stable-argsort order
            np.testing.assert_array_equal(r[CANDIDATE_SCORES], ref_s[0][: len(want)])
        assert np.isnan(rows["q0"][POSITIVE_SCORES][-1])
        # a second run with the same inputs is skipped (same manifest back)
        again = search_stage(quri, positives, index, depth_fn, ceiling_fn, cfg, str(out), "tie")
        assert again["finished_at"] == man["finished_at"] and again["key"] == man["key"]


def test_bm25_search_stage(tmp_path):
    try:
        from raymine.bm25 import BM25Teacher
    except ImportError:
        pytest.skip("raymine.bm25 not available")
    from raymine.config import TeacherConfig
    from raymine.search import bm25_search_stage

    corpus = pa.table({DOC_ID: ["d0", "d1", "d2", "d3", "d4"],
                       TEXT: ["red apples are sweet", "green apples are sour", "bananas are yellow",
                              "apples and bananas make a salad", "cars drive on roads"]})
    queries = pa.table({QUERY_ID: ["a", "b", "c"], TEXT: ["sweet red apples", "yellow bananas", "apples"]})
    positives = pa.table({QUERY_ID: ["a", "b", "c"], POSITIVE_IDS: [["d0"], ["d2", "gone"], ["d3"]],
                          EXCLUDED_IDS: [[], [], ["d1"]]})
    tcfg = TeacherConfig(kind="bm25", bm25_stopwords="")
    cfg = SearchConfig(query_batch_size=2)
    man = bm25_search_stage(queries, corpus, positives, tcfg, lambda n: 3 + n,
                            lambda s: np.array([x.min() * 0.99 for x in s], np.float32), cfg, str(tmp_path), "bm25")
    t = {r[QUERY_ID]: r for r in pq.read_table(tmp_path).to_pylist()}
    assert man["counts"]["queries"] == 3 and man["counts"]["positives_not_found"] == 1
    ref = BM25Teacher(tcfg)
    ref.index(corpus.column(DOC_ID).to_pylist(), corpus.column(TEXT).to_pylist())
    for q, text, pos in [("a", "sweet red apples", "d0"), ("b", "yellow bananas", "d2")]:
        p = ref.score([text], [[pos]])[0][0]
        assert t[q][POSITIVE_SCORES][0] == pytest.approx(p)
        ids, scores = ref.search([text], 4, np.array([p * 0.99]))
        assert t[q][CANDIDATE_IDS] == [d for d in ids[0] if d][: 4]
        assert all(s < p * 0.99 for s in t[q][CANDIDATE_SCORES])
    assert np.isnan(t["b"][POSITIVE_SCORES][1])
    # ABOVE_CEILING: every corpus doc whose BM25 score reached the query's ceiling (positives included)
    for q, text in zip(["a", "b", "c"], ["sweet red apples", "yellow bananas", "apples"], strict=True):
        full = ref.full_scores(ref.tokenize([text])[0])
        assert t[q][ABOVE_CEILING] == int((full >= np.float32(t[q][CEILING])).sum()) >= 1
    assert man["counts"]["above_ceiling"] == sum(r[ABOVE_CEILING] for r in t.values())
