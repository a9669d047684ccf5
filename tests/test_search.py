"""Sharded search through real Ray actors against brute-force numpy: Flat over S in {1,2,3,5} with
uneven (and empty) shards, tie-heavy data, k larger than a shard, per-query ceilings; IVF recall and
deeper re-query; the search stage (Ray Data query workers writing their parts, per-part resume) against
brute force and against single-index bm25s."""
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
from raymine.config import MineConfig, SearchConfig
from raymine.index import ShardedIndex, embedding_layout, plan_shards
from raymine.search import SEARCH_SCHEMA, SearchSpec, search_plan, search_teacher
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


def stage_inputs(folder, qids, positives, excluded, texts=None, emb=None, rows_per_piece=16):
    """The ingest + embed layout the search stage reads: train queries (row groups of ``rows_per_piece``)
    and, for a dense teacher, query-embedding part i = piece i."""
    from raymine import parts

    folder.mkdir(parents=True, exist_ok=True)
    t = pa.table({QUERY_ID: pa.array(qids, pa.string()), TEXT: pa.array(texts or [f"text {q}" for q in qids]),
                  POSITIVE_IDS: pa.array(positives, pa.list_(pa.string())),
                  EXCLUDED_IDS: pa.array(excluded, pa.list_(pa.string()))})
    pq.write_table(t, folder / "queries.parquet", row_group_size=rows_per_piece)
    if emb is None:
        return str(folder / "queries.parquet"), None
    for i, lo in enumerate(range(0, len(qids), rows_per_piece)):
        e = np.ascontiguousarray(emb[lo : lo + rows_per_piece], np.float32)
        parts.write_part(pa.table({QUERY_ID: pa.array(qids[lo : lo + rows_per_piece], pa.string()),
                                   EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), e.shape[1])}),
                         str(folder / "qemb"), i)
    return str(folder / "queries.parquet"), str(folder / "qemb")


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
        quri, qemb = stage_inputs(tmp_path / "in", qids, [[ids[int(np.argmax(r))]] for r in full],
                                  [[] for _ in qids], emb=queries, rows_per_piece=64)
        spec = SearchSpec("ivf", quri, qemb, str(tmp_path / "out"), MineConfig(method="naive"), cfg, 64)
        man = search_teacher(index, spec, "k", dense=True)
        assert set(man["recall"]) == {"recall@10", "recall@100"}
        assert man["recall"]["recall@10"] >= 0.9
        approx = index.search(queries, 10)[1]
        exact = index.search_exact(queries, 10)[1]
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]) >= 0.9


def test_search_plan_from_the_mining_rule():
    """Depth = required_depth + slack (or search.depth); ceiling = the mining method's, missing positives
    left out, NaN when none is left."""
    mine = MineConfig(method="percpos", perc=0.9, num_negatives=4, sampling="top1_sampled", sample_top_k=10)
    pos = [np.array([0.8, 0.6], np.float32), np.array([np.nan, -0.5], np.float32), np.array([np.nan], np.float32)]
    depth, ceil = search_plan(mine, SearchConfig(depth_slack=5), pos, np.array([2, 3, 1]))
    np.testing.assert_array_equal(depth, [10 + 2 + 5, 10 + 3 + 5, 10 + 1 + 5])
    np.testing.assert_allclose(ceil[:2], [0.6 * 0.9, -0.5 - 0.5 * 0.1], rtol=1e-6)  # min positive; pos - |pos|(1 - perc)
    assert np.isnan(ceil[2])
    depth, ceil = search_plan(mine, SearchConfig(depth=7, use_ceiling=False), pos, np.array([2, 3, 1]))
    assert (depth == 7).all() and np.isposinf(ceil).all()


def test_search_stage_table_manifest_and_resume(ray_local, tie_corpus, tmp_path):
    import os
    import shutil

    uri, ids, emb = tie_corpus
    rng = np.random.default_rng(11)
    nq = 70
    queries = rng.integers(-2, 3, size=(nq, D)).astype(np.float32)
    qids = [f"q{i}" for i in range(nq)]
    # positives: 1-3 per query; q0 has an unknown positive
    pos_lists = [[ids[j] for j in rng.choice(N, 1 + i % 3, replace=False)] for i in range(nq)]
    pos_lists[0] = pos_lists[0] + ["missing-doc"]
    exc_lists = [[ids[5]] if i % 4 == 0 else [] for i in range(nq)]
    quri, qemb = stage_inputs(tmp_path / "in", qids, pos_lists, exc_lists, emb=queries, rows_per_piece=16)
    mine = MineConfig(method="marginpos", margin=0.5, num_negatives=4, sampling="top")
    cfg = SearchConfig(num_shards=3, query_batch_size=8, depth_slack=16, search_tasks=2)
    out = tmp_path / "out"
    spec = SearchSpec("tie", quri, qemb, str(out), mine, cfg, 16)
    with ShardedIndex.from_parquet(uri, cfg) as index:
        man = search_teacher(index, spec, "upstream-key", dense=True)
        table = pq.read_table(out)
        assert table.schema.equals(SEARCH_SCHEMA)
        assert man["counts"]["queries"] == nq == table.num_rows and man["counts"]["pieces"] == 5
        assert man["counts"]["positives_not_found"] == 1
        assert man["counts"]["queries_with_positive_not_found"] == 1
        assert man["counts"]["above_ceiling"] == sum(table.column(ABOVE_CEILING).to_pylist())
        assert man["recall"] is None
        rows = {r[QUERY_ID]: r for r in table.to_pylist()}
        row_of = {d: i for i, d in enumerate(ids)}
        full = queries @ emb.T
        for i in range(nq):
            r = rows[qids[i]]
            known = [row_of[d] for d in pos_lists[i] if d in row_of]
            np.testing.assert_array_equal(r[POSITIVE_SCORES][: len(known)], full[i, known])
            ceil = full[i, known].min() - 0.5  # marginpos, min positive
            assert r[CEILING] == pytest.approx(ceil) and r[TEACHER] == "tie"
            assert r[ABOVE_CEILING] == int((full[i] >= np.float32(r[CEILING])).sum())  # positives included
            assert r[EXCLUDED_IDS] == exc_lists[i]
            depth = 4 + len(pos_lists[i]) + len(exc_lists[i]) + 16
            ref_s, ref_i = brute_force_topk(emb, queries[i : i + 1], depth, np.array([ceil]))
            want = ids[ref_i[0][ref_i[0] >= 0]].tolist()
            assert r[CANDIDATE_IDS] == want  # exact masked scan: stable-argsort order
            np.testing.assert_array_equal(r[CANDIDATE_SCORES], ref_s[0][: len(want)])
        assert np.isnan(rows["q0"][POSITIVE_SCORES][-1])
        # a second run with the same inputs is skipped (same manifest back)
        again = search_teacher(index, spec, "upstream-key", dense=True)
        assert again["finished_at"] == man["finished_at"] and again["key"] == man["key"]
        # a run that died: no manifest, one part lost, one truncated → only those two pieces are searched
        shutil.copytree(out, tmp_path / "out2")
        os.remove(tmp_path / "out2" / "_manifest.json")
        os.remove(tmp_path / "out2" / "part-000000001.parquet")
        with open(tmp_path / "out2" / "part-000000003.parquet", "r+b") as f:
            f.truncate(50)
        again = search_teacher(index, SearchSpec("tie", quri, qemb, str(tmp_path / "out2"), mine, cfg, 16),
                               "upstream-key", dense=True)
        assert again["counts"]["pieces"] == 2 and again["counts"]["parts_kept"] == 3
        assert again["counts"]["queries"] == 32 and again["counts"]["queries_total"] == nq
        got, want = pq.read_table(tmp_path / "out2").sort_by(QUERY_ID), table.sort_by(QUERY_ID)
        for col in want.column_names:  # NaN positive scores compare equal here (Arrow's equals says NaN != NaN)
            if col == POSITIVE_SCORES:
                np.testing.assert_array_equal(got[col].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                              want[col].combine_chunks().flatten().to_numpy(zero_copy_only=False))
            assert col == POSITIVE_SCORES or got[col].equals(want[col]), col


def test_bm25_search_stage_equals_single_index_bm25s(ray_local, tmp_path):
    """The sharded BM25 teacher through the stage: positive scores, ceilings and candidates equal a
    single bm25s index over the whole corpus (an independent reference)."""
    import bm25s

    from raymine.bm25 import ShardedBM25
    from raymine.columns import PASSAGE
    from raymine.config import TeacherConfig

    docs = ["red apples are sweet", "green apples are sour", "bananas are yellow", "apples and bananas make a salad",
            "cars drive on roads", "sweet yellow bananas and red apples", "roads of apples"]
    dids = [f"d{i}" for i in range(len(docs))]
    pq.write_table(pa.table({DOC_ID: dids, PASSAGE: docs}), tmp_path / "corpus.parquet", row_group_size=3)
    qtexts = ["sweet red apples", "yellow bananas", "apples"]
    quri, _ = stage_inputs(tmp_path / "in", ["a", "b", "c"], [["d0"], ["d2", "gone"], ["d3"]],
                           [[], [], ["d1"]], texts=qtexts, rows_per_piece=2)
    tcfg = TeacherConfig(kind="bm25", bm25_stopwords="")
    mine = MineConfig(method="percpos", perc=0.99, num_negatives=2, sampling="top")
    cfg = SearchConfig(num_shards=2, depth_slack=1, search_tasks=1)
    spec = SearchSpec("bm25", quri, None, str(tmp_path / "out"), mine, cfg, 2)
    with ShardedBM25.from_parquet(str(tmp_path / "corpus.parquet"), tcfg, cfg) as index:
        man = search_teacher(index, spec, "k", dense=False)
    t = {r[QUERY_ID]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert man["counts"]["queries"] == 3 and man["counts"]["positives_not_found"] == 1
    ref = bm25s.BM25(k1=tcfg.bm25_k1, b=tcfg.bm25_b, method=tcfg.bm25_method)
    ref.index(bm25s.tokenize(docs, stopwords=None, show_progress=False), show_progress=False)
    for q, text in zip(["a", "b", "c"], qtexts, strict=True):
        full = ref.get_scores(bm25s.tokenize([text], stopwords=None, show_progress=False, return_ids=False)[0])
        pos = [dids.index(d) for d in t[q][POSITIVE_IDS] if d in dids]
        np.testing.assert_allclose(t[q][POSITIVE_SCORES][: len(pos)], full[pos], rtol=1e-5)
        ceil = np.float32(full[pos].min() * 0.99)
        assert t[q][CEILING] == pytest.approx(ceil, rel=1e-5)
        below = [i for i in np.argsort(-full, kind="stable") if full[i] < ceil and full[i] > 0]
        depth = 2 + len(t[q][POSITIVE_IDS]) + len(t[q][EXCLUDED_IDS]) + 1
        assert sorted(t[q][CANDIDATE_SCORES], reverse=True) == pytest.approx(sorted(full[below][:depth], reverse=True),
                                                                              rel=1e-5)
        assert set(t[q][CANDIDATE_IDS]) <= {dids[i] for i in below}
        assert t[q][ABOVE_CEILING] == int((full >= ceil).sum())
    assert np.isnan(t["b"][POSITIVE_SCORES][1])


def test_search_key_leaves_out_resources_and_exact_shard_counts():
    """A run resumed on a resized cluster keeps its parts: task counts, CPUs and threads never change the key,
    the shard count only where shards are trained apart (IVF/PQ); CPU vs GPU does."""
    from dataclasses import replace

    from raymine.config import SearchConfig
    from raymine.search import search_key_config

    flat = SearchConfig(num_shards=2, search_tasks=2, num_cpus_per_shard=0.25, threads_per_shard=0)
    resized = replace(flat, num_shards=7, search_tasks=16, num_cpus_per_shard=2.0, threads_per_shard=4,
                      num_cpus_per_task=1.0, shard_block_bytes=1 << 20, shard_memory_overhead_mb=512,
                      score_dtype="bfloat16")  # streamed and re-scored: equal by construction (test_topk)
    assert search_key_config(resized, dense=True) == search_key_config(flat, dense=True)
    assert search_key_config(resized, dense=False) == search_key_config(flat, dense=False)  # BM25: exact
    assert search_key_config(replace(flat, num_gpus_per_shard=1.0), True) != search_key_config(flat, True)
    assert search_key_config(replace(flat, num_gpus_per_shard=1.0), True) == search_key_config(
        replace(flat, num_gpus_per_shard=0.5), True)
    assert search_key_config(replace(flat, query_batch_size=7), True) != search_key_config(flat, True)
    ivf = replace(flat, index_factory="IVF64,Flat")
    assert search_key_config(replace(ivf, num_shards=7), True) != search_key_config(ivf, True)
    assert search_key_config(replace(ivf, search_tasks=9), True) == search_key_config(ivf, True)


def test_a_deep_query_deepens_its_own_group_only(ray_local, tie_corpus):
    """Per-query depth: a query with a long excluded-id list (a cluster of identical passages) is searched at
    its own depth in its own group; every row equals the one-call search at the batch's largest depth cut to
    that row's depth (exact search: a shallower top-k is a prefix of the deeper one, ties by doc id)."""
    from raymine.search import _search_by_depth, depth_groups

    uri, ids, emb = tie_corpus
    rng = np.random.default_rng(3)
    q = rng.integers(-2, 3, size=(9, D)).astype(np.float32)
    depth = np.array([21, 22, 20, 300, 21, 0, 33, 21, 22], np.int64)  # one deep query, one with nothing to find
    groups = depth_groups(depth)
    assert sorted(np.concatenate(groups).tolist()) == list(range(9))
    assert [sorted(depth[g].tolist()) for g in groups] == [[0], [20, 21, 21, 21, 22, 22], [33], [300]]
    ceilings = np.full(9, np.inf, np.float32)
    ceilings[[1, 3]] = 2.0
    with ShardedIndex.from_parquet(uri, SearchConfig(num_shards=2)) as index:
        s, i, above, short = _search_by_depth(index, q, depth, ceilings)
        ref_s, ref_i, ref_above, ref_short = index.search_batch(q, int(depth.max()), ceilings)
    assert s.shape == (9, 300) and short == ref_short == 0
    np.testing.assert_array_equal(above, ref_above)
    for j, d in enumerate(depth):
        assert i[j][:d].tolist() == ref_i[j][:d].tolist()
        assert (i[j][2 * max(d, 1):] == "").all()  # searched at most twice as deep as it needs, not at 300
        np.testing.assert_array_equal(s[j][:d], ref_s[j][:d])
