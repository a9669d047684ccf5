"""Pure top-k math against brute force: merge over every small shard split, masked (ceiling) top-k,
torch backend vs numpy and FAISS."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from raymine.topk import (
    CPU_BLOCK_ELEMS,
    GPU_BLOCK_ELEMS,
    block_elems_for,
    brute_force_topk,
    masked_topk,
    merge_topk,
    merge_topk_by_id,
    merge_topk_positions,
    score_tolerance,
    streamed_search,
    torch_search,
)


def stable_reference(scores: np.ndarray, k: int, ceilings: np.ndarray | None = None):
    """Stable argsort over the whole row: the definition of the expected tie order."""
    s = scores.astype(np.float32).copy()
    if ceilings is not None:
        s[s >= ceilings[:, None]] = -np.inf
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(s, idx, axis=1)
    idx = np.where(np.isneginf(vals), -1, idx)
    pad = k - idx.shape[1]
    vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
    idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return vals, idx


def shard_results(scores: np.ndarray, sizes: tuple[int, ...], k_shard: int, ceilings=None):
    """Split columns into shards of ``sizes``, take each shard's exact top-k', return global ids."""
    out_s, out_i, lo = [], [], 0
    for n in sizes:
        s, i = masked_topk(scores[:, lo : lo + n], k_shard, ceilings)
        out_s.append(s)
        out_i.append(np.where(i >= 0, i + lo, -1))
        lo += n
    return out_s, out_i


def tie_heavy(rng, nq: int, nd: int) -> np.ndarray:
    return rng.integers(0, 3, size=(nq, nd)).astype(np.float32)  # 3 distinct values: ties everywhere


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_merge_equals_brute_force_every_small_split(num_shards):
    rng = np.random.default_rng(num_shards)
    checked = 0
    for sizes in itertools.product(range(0, 5), repeat=num_shards):
        nd = sum(sizes)
        scores = tie_heavy(rng, 3, nd)
        for k in range(0, nd + 3):  # k > shard size and k > corpus included
            ref = stable_reference(scores, k)
            got = merge_topk(*shard_results(scores, sizes, k), k)
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
            checked += 1
    assert checked > 10


def test_merge_all_tied_and_shuffled_inputs():
    rng = np.random.default_rng(0)
    scores = np.full((2, 11), 0.5, np.float32)
    ss, ii = shard_results(scores, (4, 0, 7), 11)
    # shard outputs in arbitrary row order must not matter
    perm = rng.permutation(ss[2].shape[1])
    ss[2], ii[2] = ss[2][:, perm], ii[2][:, perm]
    s, i = merge_topk(ss[::-1], ii[::-1], 5)
    np.testing.assert_array_equal(i, [[0, 1, 2, 3, 4]] * 2)
    assert (s == 0.5).all()


def test_merge_positions_gather_side_data():
    s1, i1 = np.array([[3.0, 1.0]], np.float32), np.array([[10, 11]])
    s2, i2 = np.array([[2.0, -np.inf]], np.float32), np.array([[20, -1]])
    s, i, pos = merge_topk_positions([s1, s2], [i1, i2], 5)
    names = np.array([["a", "b", "c", "-"]], object)
    np.testing.assert_array_equal(i, [[10, 20, 11, -1, -1]])
    np.testing.assert_array_equal(pos, [[0, 2, 1, -1, -1]])
    assert [names[0, p] for p in pos[0] if p >= 0] == ["a", "c", "b"]
    assert np.isneginf(s[0, 3:]).all()


def test_merge_rejects_bad_input():
    with pytest.raises(ValueError):
        merge_topk([np.zeros((2, 3))], [np.zeros((3, 3), np.int64)], 2)
    with pytest.raises(ValueError):
        merge_topk([np.array([[np.nan]])], [np.array([[0]])], 1)


def test_masked_topk_with_ceilings_equals_brute_force():
    rng = np.random.default_rng(1)
    for nd in (1, 5, 40):
        scores = tie_heavy(rng, 6, nd)
        ceilings = np.array([np.inf, 2.0, 1.0, 0.0, -1.0, 1.5], np.float32)  # rows 3,4: nothing below
        for k in (1, 3, nd, nd + 4):
            got = masked_topk(scores, k, ceilings)
            ref = stable_reference(scores, k, ceilings)
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
            assert (got[1][3] == -1).all() and (got[1][4] == -1).all()
            assert (got[0][got[1] >= 0] < ceilings.repeat(k).reshape(6, k)[got[1] >= 0]).all()


def test_sharded_with_ceilings_equals_brute_force():
    rng = np.random.default_rng(2)
    scores = tie_heavy(rng, 5, 17)
    ceilings = np.array([2.0, np.inf, 0.0, 1.0, 2.0], np.float32)
    for sizes in [(17,), (3, 14), (0, 9, 8), (1, 1, 1, 1, 13)]:
        for k in (1, 4, 9, 20):
            got = merge_topk(*shard_results(scores, sizes, k, ceilings), k)
            ref = stable_reference(scores, k, ceilings)
            np.testing.assert_array_equal(got[1], ref[1])


def test_nan_ceiling_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        masked_topk(np.zeros((2, 3)), 1, np.array([np.nan, 1.0]))


@pytest.mark.parametrize("block", [7, 64, 1 << 24])
def test_torch_search_equals_brute_force_tie_heavy(block):
    rng = np.random.default_rng(3)
    corpus = rng.integers(-2, 3, size=(60, 8)).astype(np.float32)  # small integers: exact float sums
    queries = rng.integers(-2, 3, size=(9, 8)).astype(np.float32)
    ceilings = rng.integers(-4, 5, size=9).astype(np.float32)
    ceilings[0] = np.inf
    ceilings[1] = -100.0  # nothing below
    for k in (1, 5, 60, 70):
        for c in (None, ceilings):
            got = torch_search(corpus, queries, k, c, max_block_elems=block)
            ref = brute_force_topk(corpus, queries, k, c)
            np.testing.assert_array_equal(got[1], ref[1])
            np.testing.assert_array_equal(got[0], ref[0])


@pytest.mark.parametrize("block", [7, 1 << 24])
def test_above_ceiling_counts_equal_numpy(block):
    """return_above: per query, how many corpus rows the ceiling removed = (scores >= ceiling).sum(1)."""
    rng = np.random.default_rng(6)
    corpus = rng.integers(-2, 3, size=(45, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(9, 8)).astype(np.float32)
    ceilings = rng.integers(-4, 5, size=9).astype(np.float32)
    ceilings[0], ceilings[1] = np.inf, -100.0  # none removed / all removed
    scores = queries @ corpus.T  # [nq, nd], exact small integers
    want = (scores >= ceilings[:, None]).sum(axis=1)
    assert want[0] == 0 and want[1] == 45 and 0 < want[2:].sum() < 45 * 7
    for k in (0, 3, 45, 50):
        s, i, above = torch_search(corpus, queries, k, ceilings, max_block_elems=block, return_above=True)
        np.testing.assert_array_equal(above, want)
        assert above.dtype == np.int64
        ref = brute_force_topk(corpus, queries, k, ceilings)  # the flag leaves the results alone
        np.testing.assert_array_equal(i, ref[1])
        np.testing.assert_array_equal(s, ref[0])
        ms, mi, mabove = masked_topk(scores, k, ceilings, return_above=True)
        np.testing.assert_array_equal(mabove, want)
        np.testing.assert_array_equal(mi, ref[1])
    np.testing.assert_array_equal(torch_search(corpus, queries, 5, None, return_above=True)[2], np.zeros(9))
    np.testing.assert_array_equal(masked_topk(scores, 5, return_above=True)[2], np.zeros(9))
    assert len(torch_search(corpus, queries, 5, ceilings)) == 2 and len(masked_topk(scores, 5, ceilings)) == 2


def test_torch_backend_equals_faiss_flat():
    import faiss  # a hard dependency: missing must fail, not skip
    rng = np.random.default_rng(4)
    corpus = rng.standard_normal((3000, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(32)
    index.add(corpus)
    fs, fi = index.search(queries, 100)
    ts, ti = torch_search(corpus, queries, 100, max_block_elems=50 * 256)
    np.testing.assert_array_equal(ti, fi)
    np.testing.assert_allclose(ts, fs, rtol=0, atol=1e-5)


def test_block_elems_default_per_device_and_free_memory():
    assert block_elems_for("cpu") == CPU_BLOCK_ELEMS == 1 << 24
    assert block_elems_for("cpu", free_bytes=1 << 40) == CPU_BLOCK_ELEMS  # the CPU default ignores free memory
    assert block_elems_for("cuda") == GPU_BLOCK_ELEMS == 1 << 28
    assert block_elems_for("cuda", free_bytes=80 << 30) == 1 << 28  # 2^28 * 32 B = 8 GiB <= 80 GiB / 4
    assert block_elems_for("cuda", free_bytes=12 << 30) == 1 << 26  # 12 GiB / 128 = 96M → 2^26
    assert block_elems_for("cuda", free_bytes=1 << 30) == CPU_BLOCK_ELEMS  # never below the CPU block
    for free in (3 << 30, 5 << 30, 17 << 30, 33 << 30):
        b = block_elems_for("cuda", free_bytes=free)
        assert b & (b - 1) == 0 and b * 32 <= free // 4 < 2 * b * 32  # the largest power of two that fits


@pytest.mark.gpu
def test_torch_search_cuda_default_block_equals_brute_force():
    """The CUDA default block (2^28 scores, sized by free memory) against the numpy reference, ties included."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(6)
    corpus = rng.integers(-2, 3, size=(30000, 16)).astype(np.float32)  # many ties
    queries = rng.integers(-2, 3, size=(300, 16)).astype(np.float32)
    ceilings = rng.integers(-3, 8, size=300).astype(np.float32)
    got = torch_search(torch.from_numpy(corpus).cuda(), queries, 100, ceilings, return_above=True)
    ref = brute_force_topk(corpus, queries, 100, ceilings)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[2], (queries @ corpus.T >= ceilings[:, None]).sum(1))


@pytest.mark.gpu
def test_torch_search_cuda_equals_cpu():
    import torch  # a hard dependency: missing must fail; only the device may be absent

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(5)
    corpus = rng.integers(-2, 3, size=(5000, 16)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(40, 16)).astype(np.float32)
    ceilings = rng.integers(-3, 8, size=40).astype(np.float32)
    for k in (10, 3000):  # 3000 > faiss-gpu's 2048 selection limit
        got = torch_search(torch.from_numpy(corpus).cuda(), queries, k, ceilings, max_block_elems=40 * 1024)
        ref = brute_force_topk(corpus, queries, k, ceilings)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[0], ref[0])


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_merge_by_id_equals_whole_corpus_order_every_small_split(num_shards):
    """Shards hold ids in any order; each returns its top-k (score desc, id asc); the merge equals the
    whole-corpus order with ties broken by the id string, whatever the split."""
    rng = np.random.default_rng(10 + num_shards)
    checked = 0
    for sizes in itertools.product(range(0, 4), repeat=num_shards):
        nd = sum(sizes)
        scores = tie_heavy(rng, 3, nd)
        ids = np.array([f"d{x}" for x in rng.permutation(nd) * 7], object)  # string order != row order
        for k in range(0, nd + 2):
            parts_s, parts_i, lo = [], [], 0
            for n in sizes:
                s_sh, i_sh = scores[:, lo : lo + n], ids[lo : lo + n]
                top_s = np.full((3, min(k, n)), -np.inf, np.float32)
                top_i = np.full((3, min(k, n)), "", object)
                for q in range(3):
                    order = sorted(range(n), key=lambda r, q=q, s_sh=s_sh, i_sh=i_sh: (-s_sh[q, r], i_sh[r]))[:k]
                    top_s[q, : len(order)], top_i[q, : len(order)] = s_sh[q, order], i_sh[order]
                parts_s.append(top_s)
                parts_i.append(top_i)
                lo += n
            got_s, got_i = merge_topk_by_id(parts_s, parts_i, k)
            for q in range(3):
                want = sorted(range(nd), key=lambda r, q=q: (-scores[q, r], ids[r]))[:k]
                assert got_i[q].tolist() == [ids[r] for r in want] + [""] * (k - len(want))
                np.testing.assert_array_equal(got_s[q, : len(want)], scores[q, want])
                assert np.isneginf(got_s[q, len(want):]).all()
            checked += 1
    assert checked > 10
    with pytest.raises(ValueError):
        merge_topk_by_id([np.zeros((2, 1), np.float32)], [np.zeros((3, 1), object)], 1)


# ------------------------------------------------------------------------------------------------
# streamed search: the corpus in its storage dtype, streamed in blocks, low-precision GEMM + float32 re-score
# ------------------------------------------------------------------------------------------------
def _near_tie_corpus(rng, n: int, d: int) -> np.ndarray:
    """Unit vectors with exact duplicates (equal scores, broken by row) and near-duplicates (scores closer than
    the fp16/bf16 GEMM error, so the low-precision order is wrong and only the re-score gets it right)."""
    emb = rng.standard_normal((n, d))
    emb[n // 2 : n // 2 + 20] = emb[:20]  # exact duplicates
    emb[-20:] = emb[20:40] + 1e-3 * rng.standard_normal((20, d))  # near-duplicates
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("storage", "score"), [("float32", "float32"), ("float16", "float32"),
                                                ("float32", "bfloat16"), ("float16", "bfloat16"),
                                                ("float16", "float16")])
def test_streamed_search_equals_in_memory_float32_of_the_stored_vectors(storage, score):
    """Budget smaller than the corpus (blocks of 37 / 100 rows) == one in-memory float32 search == brute force of
    the stored (rounded) vectors: the same rows in the same order (ties by row), the same scores, the same counts
    above the ceiling; whatever the GEMM's dtype."""
    import torch

    rng = np.random.default_rng(21)
    n, d, nq = 400, 24, 30
    emb = _near_tie_corpus(rng, n, d)
    stored = emb.astype(storage)  # [n, d] what a shard holds: no float32 copy
    ref_corpus = stored.astype(np.float32)  # the stored values, upcast: the reference's corpus
    queries = np.concatenate([emb[:10], emb[-10:] + 0.01, rng.standard_normal((10, d))]).astype(np.float32)
    full = queries @ ref_corpus.T  # [nq, n]
    srt = -np.sort(-full, axis=1)
    r = 6 + np.argmax(srt[:, 6:-1] - srt[:, 7:] > 1e-4, axis=1)  # [nq] a rank >= 7 with a gap above float noise
    ceil = ((srt[np.arange(nq), r] + srt[np.arange(nq), r + 1]) / 2).astype(np.float32)  # r + 1 rows above
    ceil[:3] = np.inf
    ceil[3] = srt[3, 2]  # a ceiling equal to a score (score >= ceiling is excluded)
    ceil[4] = -50.0  # nothing below
    sd = getattr(torch, score)
    for k in (1, 10, 60):
        for c in (None, ceil):
            ref_s, ref_i = brute_force_topk(ref_corpus, queries, k, c)
            inmem = torch_search(ref_corpus, queries, k, c, return_above=True)
            # an fp16 GEMM costs ~20 ms a call on this CPU (no fast kernel): one block size for it
            for block_rows in (37,) if score == "float16" else (37, 100, None):
                s, i, above = streamed_search(stored, queries, k, c, block_rows=block_rows, score_dtype=sd,
                                              max_block_elems=nq * 100, return_above=True)
                np.testing.assert_array_equal(i, ref_i)
                np.testing.assert_array_equal(i, inmem[1])
                np.testing.assert_allclose(s, ref_s, rtol=0, atol=2e-6)
                np.testing.assert_array_equal(above, inmem[2])
                if c is not None:
                    np.testing.assert_array_equal(above, (full >= c[:, None]).sum(axis=1))
    if score != "float32":  # the low-precision scores alone would have ranked some queries wrongly
        approx = (torch.from_numpy(queries).to(sd) @ torch.from_numpy(stored).to(sd).T).float().numpy()
        _, ai = brute_force_topk(np.eye(n, dtype=np.float32), approx, 10)
        assert (ai != brute_force_topk(ref_corpus, queries, 10)[1]).any()


def test_streamed_search_ties_and_small_integers_bit_exact():
    """Small integers are exact in fp16 and bf16: every score a tie somewhere, equal bit for bit to brute force
    at every block size, with the ceiling counts; k = 0 still counts the ceiling's removals."""
    import torch

    rng = np.random.default_rng(22)
    corpus = rng.integers(-2, 3, size=(90, 8)).astype(np.float16)
    queries = rng.integers(-2, 3, size=(11, 8)).astype(np.float32)
    ceil = rng.integers(-4, 5, size=11).astype(np.float32)
    ceil[0], ceil[1] = np.inf, -100.0
    want_above = (queries @ corpus.astype(np.float32).T >= ceil[:, None]).sum(axis=1)
    for sd, blocks in ((torch.bfloat16, (3, None)), (torch.float32, (3,)), (torch.float16, (None,))):
        for block_rows in blocks:
            for k in (0, 1, 7, 95):
                s, i, above = streamed_search(corpus, queries, k, ceil, block_rows=block_rows, score_dtype=sd,
                                              max_block_elems=11 * 20, return_above=True)
                ref = brute_force_topk(corpus.astype(np.float32), queries, k, ceil)
                np.testing.assert_array_equal(i, ref[1])
                np.testing.assert_array_equal(s, ref[0])
                np.testing.assert_array_equal(above, want_above)


def test_score_tolerance_bounds_the_low_precision_error():
    """The bound the re-score relies on holds on unit vectors, and is 0 for float32 (the reference)."""
    import torch

    rng = np.random.default_rng(23)
    d = 256
    c = rng.standard_normal((2000, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = rng.standard_normal((50, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = q.astype(np.float64) @ c.astype(np.float64).T
    assert score_tolerance("float32", d) == 0.0
    for name in ("float16", "bfloat16"):
        sd = getattr(torch, name)
        approx = (torch.from_numpy(q).to(sd) @ torch.from_numpy(c).to(sd).T).double().numpy()
        err = np.abs(approx - exact).max()
        assert 0 < err <= score_tolerance(name, d), (name, err)


@pytest.mark.gpu
def test_streamed_search_cuda_fp16_storage_equals_float32_reference():
    """The GPU path: an fp16 corpus on the host streamed to CUDA in blocks, an fp16 GEMM, a float32 re-score near
    the k-th score and the ceiling: the rows of the float32 search of the stored vectors (and, on small
    integers, its scores bit for bit); bf16 the same."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(24)
    emb = _near_tie_corpus(rng, 20000, 64)
    stored = emb.astype(np.float16)
    queries = np.concatenate([emb[:100], rng.standard_normal((100, 64))]).astype(np.float32)
    ref_corpus = stored.astype(np.float32)
    full = queries @ ref_corpus.T
    srt = -np.sort(-full, axis=1)[:, :200]
    r = 40 + np.argmax(srt[:, 40:-1] - srt[:, 41:] > 1e-4, axis=1)  # a rank with a gap above float noise
    ceil = ((srt[np.arange(len(r)), r] + srt[np.arange(len(r)), r + 1]) / 2).astype(np.float32)
    for sd in (torch.float16, torch.bfloat16):
        for c in (None, ceil):
            ref = torch_search(ref_corpus, queries, 100, c, return_above=True)
            got = streamed_search(stored, queries, 100, c, block_rows=3000, device="cuda", score_dtype=sd,
                                  return_above=True)
            assert (got[1] == ref[1]).mean() > 0.999  # float32 summation order aside
            np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(got[2], ref[2])
    ints = rng.integers(-2, 3, size=(30000, 16)).astype(np.float16)
    q = rng.integers(-2, 3, size=(300, 16)).astype(np.float32)
    c = rng.integers(-3, 8, size=300).astype(np.float32)
    got = streamed_search(ints, q, 100, c, block_rows=4096, device="cuda", return_above=True)
    ref = brute_force_topk(ints.astype(np.float32), q, 100, c)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[2], (q @ ints.astype(np.float32).T >= c[:, None]).sum(1))
