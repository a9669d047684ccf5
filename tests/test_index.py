"""The sharded FAISS index client against brute-force numpy: a pickled client used inside Ray tasks
(stateless ``search_batch``), IVF-PQ candidates re-scored exactly (every returned candidate satisfies the
exact ceiling; recall vs exact printed), codes-only shards (vectors re-read from Parquet), and exhausted
queries re-queried with a larger nprobe."""
from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.columns import DOC_ID, EMBEDDING
from raymine.config import SearchConfig
from raymine.index import ShardedIndex, recall_at_k
from raymine.topk import brute_force_topk


def write_embeddings(folder, ids, emb, splits=(0.3, 0.7, 1.0), row_group=None) -> str:
    """``emb [n, d]`` as several Parquet files of fixed_size_list<float32> (the embed layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0] + [int(len(ids) * s) for s in splits]
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        flat = pa.array(np.ascontiguousarray(emb[lo:hi], np.float32).reshape(-1))
        t = pa.table({DOC_ID: pa.array(ids[lo:hi], pa.string()),
                      EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})
        pq.write_table(t, folder / f"part-{f:05d}.parquet", row_group_size=row_group)
    return str(folder)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Clustered, L2-normalised vectors (40 centres, d=32): PQ errors are visible at this size."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, 32))
    emb = centres[rng.integers(0, 40, 4000)] + 0.35 * rng.standard_normal((4000, 32))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    q = centres[rng.integers(0, 40, 120)] + 0.35 * rng.standard_normal((120, 32))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"c{i:05d}" for i in range(4000)], dtype=object)
    uri = write_embeddings(tmp_path_factory.mktemp("clustered"), ids, emb, row_group=500)
    return uri, ids, emb, q


def ceilings_between_ranks(full: np.ndarray, rank: int) -> np.ndarray:
    """Per query, a ceiling halfway between the scores at ``rank`` and ``rank + 1`` (no score equals it)."""
    srt = np.sort(full, axis=1)[:, ::-1]
    return ((srt[:, rank - 1] + srt[:, rank]) / 2).astype(np.float32)


def test_pickled_client_searches_inside_ray_tasks(ray_local, clustered):
    import ray

    uri, ids, emb, queries = clustered
    with ShardedIndex.from_parquet(uri, SearchConfig(num_shards=3)) as index:
        blob = pickle.dumps(index)
        assert len(blob) < 20_000  # actor handles + metadata, no vectors
        ceil = ceilings_between_ranks(queries @ emb.T, 25)
        ceil[:10] = np.inf

        @ray.remote(num_cpus=0.25)
        def task(ix, q, c):
            return ix.search_batch(q, 12, c)

        refs = [task.remote(index, queries[lo : lo + 40], ceil[lo : lo + 40]) for lo in (0, 40, 80)]
        parts = ray.get(refs)
        s = np.concatenate([p[0] for p in parts])
        got = np.concatenate([p[1] for p in parts])
        above = np.concatenate([p[2] for p in parts])
        assert all(p[3] == 0 for p in parts)
        ref_s, ref_i = brute_force_topk(emb, queries, 12, ceil)
        np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)
        assert (got == ids[ref_i]).mean() > 0.999  # float ties aside, the same docs
        np.testing.assert_array_equal(above, ((queries @ emb.T) >= ceil[:, None]).sum(axis=1) * (ceil < np.inf))
        # the driver's client is untouched by the calls (stateless), and gives the same answer itself
        assert index.last_stats == {} and index.last_above_ceiling.size == 0
        s2, got2, above2, short2 = index.search_batch(queries, 12, ceil)
        np.testing.assert_array_equal(s2, s)
        np.testing.assert_array_equal(got2, got)
        assert index.last_stats == {} and short2 == 0


@pytest.mark.parametrize("keep_vectors", [True, False])
def test_ivfpq_candidates_satisfy_the_exact_ceiling(ray_local, clustered, keep_vectors):
    import faiss

    uri, ids, emb, queries = clustered
    full = queries @ emb.T  # [nq, N] exact scores, numpy
    # the defect being fixed: PQ scores of the same data are off by far more than float noise (4-bit codes: 16
    # centroids per sub-quantizer train in seconds on 2 cores; 8-bit codes took minutes)
    pq_index = faiss.index_factory(32, "IVF16,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    pq_index.train(emb)
    pq_index.add(emb)
    pq_index.nprobe = 16
    d, i = pq_index.search(queries, 50)
    assert np.abs(d - np.take_along_axis(full, i, axis=1)).max() > 0.02

    cfg = SearchConfig(num_shards=2, index_factory="IVF16,PQ8x4", nprobe=4, train_sample=2000, max_depth=512,
                       refine_factor=2, keep_vectors=keep_vectors)
    k = 10
    ceil = ceilings_between_ranks(full, 30)  # 30 docs above: the candidates start at rank 31
    ceil[::7] = np.inf
    with ShardedIndex.from_parquet(uri, cfg) as index:
        assert all(i["vectors_in_ram"] is keep_vectors for i in index.infos)
        s, got, above, short, stats = index.search_batch(queries, k, ceil, return_stats=True)
        row = {d: r for r, d in enumerate(ids)}
        n_cand = 0
        for q in range(len(queries)):
            valid = got[q] != ""
            rows = [row[d] for d in got[q][valid]]
            n_cand += len(rows)
            assert (full[q, rows] < ceil[q]).all()  # every candidate below the EXACT ceiling
            np.testing.assert_allclose(s[q][valid], full[q, rows], rtol=0, atol=1e-5)  # exact scores returned
            assert (np.diff(s[q][valid]) <= 0).all() and len(set(rows)) == len(rows)
        assert n_cand == len(queries) * k - short * k or short == 0
        assert short == 0 and n_cand == len(queries) * k
        assert (above[np.isfinite(ceil)] <= 30).all()  # a lower bound on the 30 docs above
        _, exact_i = brute_force_topk(emb, queries, k, ceil)
        recall = recall_at_k(got, ids[exact_i])
        print(f"\nIVF16,PQ8x4 (nprobe 4, refine x2, keep_vectors={keep_vectors}): recall@{k} below the ceiling vs "
              f"exact = {recall:.3f}; stats {stats}")
        assert recall >= 0.7
        # positive scores: exact inner products from RAM or re-read from Parquet
        lists = [[ids[5], "nope", ids[3999]], []] + [[ids[q]] for q in range(2, len(queries))]
        got_pos = index.lookup_scores(queries, lists)
        np.testing.assert_allclose(got_pos[0][[0, 2]], full[0, [5, 3999]], rtol=0, atol=1e-6)
        assert np.isnan(got_pos[0][1]) and got_pos[1].shape == (0,)
        # exact sharded scan (the recall reference) works without vectors in RAM too
        es, en = index.search_exact(queries[:20], k, ceil[:20])
        ref_s, ref_i = brute_force_topk(emb, queries[:20], k, ceil[:20])
        np.testing.assert_allclose(es, ref_s, rtol=0, atol=1e-6)
        assert (en == ids[ref_i]).mean() > 0.99


def test_exhausted_queries_are_requeried_with_a_larger_nprobe(ray_local, clustered):
    uri, ids, emb, queries = clustered
    full = queries @ emb.T
    # 64 cells over 2000 docs a shard: ~30 docs a cell; nprobe 1 cannot fill k=100 (x2 refine)
    cfg = SearchConfig(num_shards=2, index_factory="IVF64,Flat", nprobe=1, train_sample=2000, max_nprobe=64)
    with ShardedIndex.from_parquet(uri, cfg) as index:
        s, got, _, short, stats = index.search_batch(queries, 100, return_stats=True)
        # exhausted somewhere: every query; re-queried: those the other shard could not make up for
        assert stats["exhausted"] > len(queries) // 2 and 0 < stats["requeried_nprobe"] <= stats["exhausted"]
        assert short == 0 and stats["short"] == 0 and stats["max_nprobe"] > 1 and (got != "").all()
        rows = np.vectorize({d: r for r, d in enumerate(ids)}.get)(got)
        np.testing.assert_allclose(s, np.take_along_axis(full, rows, axis=1), rtol=0, atol=1e-5)
    # with the re-query capped at the starting nprobe, the queries left short are counted
    cfg = SearchConfig(num_shards=2, index_factory="IVF64,Flat", nprobe=1, train_sample=2000, max_nprobe=1)
    with ShardedIndex.from_parquet(uri, cfg) as index:
        s, got, _, short, stats = index.search_batch(queries, 100, return_stats=True)
        assert 0 < short <= stats["exhausted"] and stats["requeried_nprobe"] == 0
        assert ((got == "").any(axis=1).sum()) == short  # short = the queries with missing results


def test_ties_break_by_doc_id_whatever_the_file_layout(ray_local, tmp_path):
    """Small-integer vectors (ties everywhere), ids unrelated to row order: one file and a shuffled
    three-file copy, split into different shards, give the same lists — score descending, ties by id."""
    rng = np.random.default_rng(3)
    n, d, k = 300, 4, 25
    emb = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
    ids = np.array([f"t{i:04d}" for i in rng.permutation(n)], object)
    queries = rng.integers(-1, 2, size=(9, d)).astype(np.float32)
    full = queries @ emb.T  # [nq, n] exact small integers
    ceil = np.array([np.inf, 1.0, 2.0, 0.0, np.inf, 1.0, 3.0, 2.0, -5.0], np.float32)
    perm = rng.permutation(n)
    layouts = [(write_embeddings(tmp_path / "one", ids, emb, splits=(1.0,)), [n]),
               (write_embeddings(tmp_path / "three", ids[perm], emb[perm], row_group=40), [120, 0, 180])]
    for c in (None, ceil):
        want = []
        for q in range(len(queries)):
            ok = [r for r in range(n) if c is None or full[q, r] < c[q]]
            top = sorted(ok, key=lambda r, q=q: (-full[q, r], ids[r]))[:k]
            want.append([ids[r] for r in top] + [""] * (k - len(top)))
        for uri, sizes in layouts:
            cfg = SearchConfig(num_shards=len(sizes), backend="torch")
            with ShardedIndex.from_parquet(uri, cfg, shard_rows=sizes) as index:
                _, got, _, _ = index.search_batch(queries, k, c)
                assert got.tolist() == want


def _write_stored(folder, ids, emb, dtype, splits=(0.4, 1.0), row_group=50) -> str:
    """Like :func:`write_embeddings`, with the vectors stored as ``dtype`` (what embed writes for storage_dtype)."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0] + [int(len(ids) * s) for s in splits]
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        flat = pa.array(np.ascontiguousarray(emb[lo:hi], dtype).reshape(-1))
        t = pa.table({DOC_ID: pa.array(ids[lo:hi], pa.string()),
                      EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})
        pq.write_table(t, folder / f"part-{f:05d}.parquet", row_group_size=row_group)
    return str(folder)


def test_streamed_shards_in_their_storage_dtype_equal_brute_force(ray_local, tmp_path):
    """float32 and float16 shards, streamed through a budget of 24 rows (shards hold 150 and 250), equal brute
    force (= the in-memory search, tests/test_topk.py) — ties (duplicate vectors, small-integer scores) broken by doc id — with a
    bfloat16 GEMM + float32 re-score too; an fp16 shard holds half the bytes; each actor asked Ray for its memory."""
    import ray

    from raymine.index import shard_actor_options

    rng = np.random.default_rng(31)
    n, d, k = 400, 8, 30
    emb = rng.integers(-2, 3, size=(n, d)).astype(np.float32)  # exact in fp16 and bf16
    emb[200:260] = emb[:60]  # duplicate vectors: equal scores everywhere
    ids = np.array([f"s{i:04d}" for i in rng.permutation(n)], object)  # id order unrelated to rows
    queries = rng.integers(-2, 3, size=(7, d)).astype(np.float32)
    full = queries @ emb.T
    ceil = np.array([np.inf, 2.0, 3.0, 0.0, np.inf, -9.0, 4.0], np.float32)
    want = {}
    for c in (None, ceil):
        lists = []
        for q in range(len(queries)):
            ok = [r for r in range(n) if c is None or full[q, r] < c[q]]
            top = sorted(ok, key=lambda r, q=q: (-full[q, r], ids[r]))[:k]
            lists.append([ids[r] for r in top] + [""] * (k - len(top)))
        want[c is None] = lists
    sizes = [150, 250]
    vector_bytes = {}
    for dtype in (np.float32, np.float16):
        uri = _write_stored(tmp_path / np.dtype(dtype).name, ids, emb, dtype)
        budget = 24 * d * np.dtype(dtype).itemsize
        cfgs = [SearchConfig(num_shards=2, backend="torch", shard_block_bytes=budget)]  # upcast per block
        if dtype == np.float16:  # and the GPU's way: a low-precision GEMM, re-scored (kernel tests: test_topk)
            cfgs.append(SearchConfig(num_shards=2, backend="torch", shard_block_bytes=budget, score_dtype="bfloat16"))
        for cfg in cfgs:
            with ShardedIndex.from_parquet(uri, cfg, shard_rows=sizes) as index:
                assert {i["storage_dtype"] for i in index.infos} == {np.dtype(dtype).name}
                vector_bytes[np.dtype(dtype).name] = sum(i["vector_bytes"] for i in index.infos)
                requested = sum(shard_actor_options(cfg, s, d, np.dtype(dtype).itemsize)["memory"] for s in sizes)
                used = ray.cluster_resources()["memory"] - ray.available_resources()["memory"]
                assert used >= requested
                for c in (None, ceil):
                    s, got, above, _ = index.search_batch(queries, k, c)
                    assert got.tolist() == want[c is None], (dtype, cfg)
                    valid = got != ""
                    np.testing.assert_array_equal(s[valid], np.sort(np.where(
                        (c is None) | (full < (np.inf if c is None else c[:, None])), full, -np.inf), axis=1)[
                        :, ::-1][:, :k][valid])
                    if c is not None:
                        np.testing.assert_array_equal(above, (full >= c[:, None]).sum(axis=1) * np.isfinite(c))
                pos = index.lookup_scores(queries[:2], [[ids[0], ids[399]], [ids[5]]])  # exact, stored values
                np.testing.assert_array_equal(pos[0], full[0, [0, 399]])
                np.testing.assert_array_equal(pos[1], full[1, [5]])
    assert vector_bytes == {"float32": n * d * 4, "float16": n * d * 2}  # fp16 shards: half the host RAM


def test_shard_actor_options_spread_with_a_memory_request():
    from raymine.index import ID_BYTES, shard_actor_options

    cfg = SearchConfig(num_cpus_per_shard=0.5, num_gpus_per_shard=1, shard_memory_overhead_mb=100)
    opts = shard_actor_options(cfg, rows=1_000_000, dim=4096, value_bytes=2)
    assert opts["scheduling_strategy"] == "SPREAD"
    assert opts["memory"] == 1_000_000 * 4096 * 2 + 1_000_000 * ID_BYTES + 100 * 2**20
    assert opts["num_cpus"] == 0.5 and opts["num_gpus"] == 1 and opts["max_restarts"] == -1
    assert shard_actor_options(cfg, 0, 4096, 4)["memory"] == 100 * 2**20
