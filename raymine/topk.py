"""Exact top-k math shared by the shard actors and the driver: merge of per-shard lists, masked
(ceiling-aware) top-k in numpy, and a chunked torch matmul + top-k backend.

No Ray or FAISS import here: this module runs on GPU machines that have neither.

Conventions everywhere:
- scores are inner products, higher is better; results are sorted descending;
- ties are broken by the smaller id, i.e. exactly what ``np.argsort(-scores, kind="stable")`` over the
  concatenated corpus gives;
- a missing entry (fewer than k results) is ``(-inf, -1)``;
- a ceiling excludes every entry with ``score >= ceiling`` before the selection (``+inf`` = no ceiling);
  ``return_above=True`` also returns how many entries each query lost that way (``above [nq] int64``),
  so the removals made inside the search can be reported.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: 1.8 s cold, and the driver merge does not need it
    import torch

log = logging.getLogger(__name__)

MISSING_ID = -1
_ID_LAST = np.iinfo(np.int64).max  # sort key that puts missing ids after every real id


def _check_ceilings(ceilings: np.ndarray | None, nq: int) -> np.ndarray | None:
    if ceilings is None:
        return None
    c = np.array(ceilings, dtype=np.float32).reshape(-1)  # a writable copy (inputs may be read-only)
    if c.shape[0] != nq:
        raise ValueError(f"ceilings has {c.shape[0]} entries for {nq} queries")
    if np.isnan(c).any():
        raise ValueError("ceilings contain NaN; use +inf for 'no ceiling'")
    return c


# ------------------------------------------------------------------------------------------------
def merge_topk_positions(
    scores_list: Sequence[np.ndarray], ids_list: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`merge_topk`, plus ``pos [nq,k]``: the column of each result in the column-wise
    concatenation of the inputs (-1 where missing), so callers can gather side data (string ids)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if len(scores_list) != len(ids_list) or not scores_list:
        raise ValueError("scores_list and ids_list must be non-empty and of equal length")
    nq = np.asarray(scores_list[0]).shape[0]
    parts_s, parts_i = [], []
    for s, i in zip(scores_list, ids_list, strict=True):
        s = np.asarray(s, dtype=np.float32)
        i = np.asarray(i, dtype=np.int64)
        if s.ndim != 2 or s.shape != i.shape or s.shape[0] != nq:
            raise ValueError(f"each scores/ids pair must be [nq={nq}, k_i]; got {s.shape} and {i.shape}")
        parts_s.append(s)
        parts_i.append(i)
    scores = np.concatenate(parts_s, axis=1)  # [nq, sum k_i]
    ids = np.concatenate(parts_i, axis=1)  # [nq, sum k_i]
    missing = ids < 0
    if np.isnan(scores[~missing]).any():
        raise ValueError("scores contain NaN")
    key_s = np.where(missing, np.inf, -scores)  # ascending sort of -score = descending score
    key_i = np.where(missing, _ID_LAST, ids)
    order = np.lexsort((key_i, key_s), axis=1)[:, :k]  # [nq, min(k, sum k_i)]
    out_s = np.take_along_axis(scores, order, axis=1)
    out_i = np.take_along_axis(ids, order, axis=1)
    miss = np.take_along_axis(missing, order, axis=1)
    out_s[miss] = -np.inf
    out_i[miss] = MISSING_ID
    pos = np.where(miss, -1, order)
    pad = k - order.shape[1]
    if pad > 0:
        out_s = np.concatenate([out_s, np.full((nq, pad), -np.inf, np.float32)], axis=1)  # [nq, k]
        out_i = np.concatenate([out_i, np.full((nq, pad), MISSING_ID, np.int64)], axis=1)  # [nq, k]
        pos = np.concatenate([pos, np.full((nq, pad), -1, np.int64)], axis=1)  # [nq, k]
    return out_s.astype(np.float32, copy=False), out_i, pos.astype(np.int64, copy=False)


def merge_topk(
    scores_list: Sequence[np.ndarray], ids_list: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top lists into the global top-k.

    scores_list[i], ids_list[i]: ``[nq, k_i]`` (float32 scores, int64 *global* ids, -1 = missing; any
    order within a row). Returns ``(scores [nq,k] float32, ids [nq,k] int64)``, sorted descending, ties
    by smaller id, missing as ``(-inf, -1)``. Equal to a brute-force top-k over the concatenated corpus
    when every shard returned its own exact top-k (same tie rule).
    """
    s, i, _ = merge_topk_positions(scores_list, ids_list, k)
    return s, i


def merge_topk_by_id(
    scores_list: Sequence[np.ndarray], ids_list: Sequence[np.ndarray], k: int, return_positions: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard top lists keyed by the user's string ids: ties by the smaller id string.

    scores_list[i] float32 ``[nq, k_i]``, ids_list[i] object ``[nq, k_i]`` ("" = missing). Returns
    ``(scores [nq,k] float32, ids object [nq,k])`` sorted descending, ties by id (code-point order, what
    ``sorted`` gives), missing as ``(-inf, "")``. Equal to a top-k over the whole corpus with the same tie
    rule when every shard returned its own top-k under that rule; independent of row order and of how
    the corpus was split into shards. ``return_positions``: also ``pos [nq,k]``, each result's column in
    the column-wise concatenation of the inputs (-1 where missing), to gather side data."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if len(scores_list) != len(ids_list) or not scores_list:
        raise ValueError("scores_list and ids_list must be non-empty and of equal length")
    nq = np.asarray(scores_list[0]).shape[0]
    for s, i in zip(scores_list, ids_list, strict=True):
        if np.ndim(s) != 2 or np.shape(s) != np.shape(i) or np.shape(s)[0] != nq:
            raise ValueError(f"each scores/ids pair must be [nq={nq}, k_i]; got {np.shape(s)} and {np.shape(i)}")
    scores = np.concatenate([np.asarray(s, np.float32) for s in scores_list], axis=1)  # [nq, sum k_i]
    ids = np.concatenate([np.asarray(i, object) for i in ids_list], axis=1)  # [nq, sum k_i]
    missing = ids == ""
    if np.isnan(scores[~missing]).any():
        raise ValueError("scores contain NaN")
    key_s = np.where(missing, np.inf, -scores)  # ascending sort of -score = descending score
    key_i = ids.astype(str) if ids.size else np.empty(ids.shape, str)  # fixed-width unicode: sortable
    order = np.lexsort((key_i, key_s), axis=1)[:, :k]  # [nq, min(k, sum k_i)]
    out_s = np.take_along_axis(scores, order, axis=1)
    out_i = np.take_along_axis(ids, order, axis=1)
    miss = np.take_along_axis(missing, order, axis=1)
    out_s[miss] = -np.inf
    out_i[miss] = ""
    pad = k - order.shape[1]
    pos = np.where(miss, -1, order).astype(np.int64)
    if pad > 0:
        out_s = np.concatenate([out_s, np.full((nq, pad), -np.inf, np.float32)], axis=1)  # [nq, k]
        out_i = np.concatenate([out_i, np.full((nq, pad), "", object)], axis=1)  # [nq, k]
        pos = np.concatenate([pos, np.full((nq, pad), -1, np.int64)], axis=1)  # [nq, k]
    out = out_s.astype(np.float32, copy=False), out_i.astype(object, copy=False)
    return (*out, pos) if return_positions else out


# ------------------------------------------------------------------------------------------------
def masked_topk(
    scores: np.ndarray, k: int, ceilings: np.ndarray | None = None, return_above: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k of each row of ``scores [nq, nd]`` with entries ``>= ceilings[q]`` excluded first.

    Returns ``(scores [nq,k] float32, ids [nq,k] int64 column indices)``; rows with fewer than k
    allowed entries are padded with ``(-inf, -1)``. Deterministic ties: the smaller column wins, also
    at the k-th place (what a stable argsort gives). ``return_above``: also ``above [nq] int64``, the
    number of entries ``>= ceilings[q]`` (0 without a ceiling).
    """
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError(f"scores must be [nq, nd], got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    nq, nd = s.shape
    c = _check_ceilings(ceilings, nq)
    above = np.zeros(nq, np.int64)
    if c is not None:
        over = s >= c[:, None]  # [nq, nd]
        above = over.sum(axis=1).astype(np.int64)
        s = np.where(over, np.float32(-np.inf), s)  # [nq, nd]
    kk = min(k, nd)
    if kk == 0:
        vals = np.empty((nq, 0), np.float32)
        idx = np.empty((nq, 0), np.int64)
    elif kk == nd:
        idx = np.argsort(-s, axis=1, kind="stable")  # [nq, nd]
        vals = np.take_along_axis(s, idx, axis=1)
    else:
        t = np.partition(s, nd - kk, axis=1)[:, nd - kk : nd - kk + 1]  # [nq, 1] k-th largest
        gt = s > t
        need = kk - gt.sum(axis=1, keepdims=True)  # [nq, 1]
        tie = s == t
        take = gt | (tie & (np.cumsum(tie, axis=1) <= need))  # exactly kk per row
        idx = np.nonzero(take)[1].reshape(nq, kk)  # row-major: columns ascending
        vals = np.take_along_axis(s, idx, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
    idx = idx.astype(np.int64)
    idx[np.isneginf(vals)] = MISSING_ID
    vals, idx = _pad(vals.astype(np.float32), idx, k)
    return (vals, idx, above) if return_above else (vals, idx)


def _pad(vals: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    nq, have = vals.shape
    if have >= k:
        return vals, ids
    vals = np.concatenate([vals, np.full((nq, k - have), -np.inf, np.float32)], axis=1)  # [nq, k]
    ids = np.concatenate([ids, np.full((nq, k - have), MISSING_ID, np.int64)], axis=1)  # [nq, k]
    return vals, ids


def brute_force_topk(
    corpus: np.ndarray, queries: np.ndarray, k: int, ceilings: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full score matrix + stable argsort. Only for tests and small data (``[nq, nd]`` in memory)."""
    s = np.asarray(queries, np.float32) @ np.asarray(corpus, np.float32).T  # [nq, nd]
    c = _check_ceilings(ceilings, s.shape[0])
    if c is not None:
        s = np.where(s >= c[:, None], np.float32(-np.inf), s)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)  # [nq, min(k, nd)]
    vals = np.take_along_axis(s, idx, axis=1)
    idx[np.isneginf(vals)] = MISSING_ID
    return _pad(vals.astype(np.float32), idx, k)


# ------------------------------------------------------------------------------------------------
CPU_BLOCK_ELEMS = 1 << 24  # 64 MB fp32 score block: small next to a CPU node's RAM
GPU_BLOCK_ELEMS = 1 << 28  # 1 GB fp32: per-block top-k overhead amortised (bench/bench_gpu.py: 2.1x over 2^24 on an H200)


def block_elems_for(device_type: str, free_bytes: int | None = None) -> int:
    """Default score-block size of :func:`torch_search` on a device: ``CPU_BLOCK_ELEMS`` off the GPU; on a GPU
    ``GPU_BLOCK_ELEMS``, lowered (to a power of two, at least ``CPU_BLOCK_ELEMS``) so the block and its
    temporaries (about 32 bytes per score: the fp32 block, its masked copy, masks, the tie cumsum) take at most
    a quarter of ``free_bytes``."""
    if device_type != "cuda":
        return CPU_BLOCK_ELEMS
    if free_bytes is None:
        return GPU_BLOCK_ELEMS
    fit = max(int(free_bytes) // (4 * 32), 1)
    return max(CPU_BLOCK_ELEMS, min(GPU_BLOCK_ELEMS, 1 << (fit.bit_length() - 1)))


def default_block_elems(device: torch.device) -> int:
    """What :func:`torch_search` uses when ``max_block_elems`` is None: :func:`block_elems_for` ``device``, with
    its free memory now on a GPU."""
    import torch

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return block_elems_for(device.type, free)


def _torch_topk_exact(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``s [nq, m]`` (k <= m) with the smaller column winning ties, also at the k-th place."""
    import torch

    nq, m = s.shape
    if k == m:
        vals, idx = torch.sort(s, dim=1, descending=True, stable=True)
        return vals, idx
    t = torch.topk(s, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values  # [nq, 1]
    gt = s > t
    need = k - gt.sum(dim=1, keepdim=True)  # [nq, 1]
    tie = s == t
    take = gt | (tie & (torch.cumsum(tie, dim=1, dtype=torch.int32) <= need))  # exactly k per row
    idx = take.nonzero()[:, 1].view(nq, k)  # row-major: columns ascending
    vals = s.gather(1, idx)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def torch_search(
    corpus: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int,
    ceilings: np.ndarray | None = None,
    max_block_elems: int | None = None,
    return_above: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact inner-product search: ``corpus [nd, d]``, ``queries [nq, d]`` → ``(scores [nq,k] float32,
    ids [nq,k] int64 corpus rows)``, entries ``>= ceilings[q]`` excluded before the selection.
    ``return_above``: also ``above [nq] int64``, how many corpus rows scored ``>= ceilings[q]`` (the
    rows the ceiling removed; 0 without a ceiling), counted in the same scan.

    The corpus is scanned in row blocks so the score block ``[nq, rows]`` stays under
    ``max_block_elems`` floats (the ``[nq, nd]`` matrix is never built; ``None``: :func:`default_block_elems` of the
    corpus' device); runs on the corpus' device (CUDA when the corpus tensor is there), scoring in the corpus'
    dtype (a float16/bfloat16 corpus is re-scored near the k-th score and the ceiling: :func:`streamed_search`).
    Same tie rule as :func:`masked_topk`.
    """
    import torch

    cor = torch.as_tensor(corpus)
    return streamed_search(cor, queries, k, ceilings, score_dtype=cor.dtype, max_block_elems=max_block_elems,
                           return_above=return_above)


# unit roundoff of the GEMM input/output dtype (float32 scoring is the reference: no re-score)
_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0}


def score_tolerance(score_dtype: str, dim: int) -> float:
    """Bound on ``|score in score_dtype - float32 score|`` per unit of ``||q||·||c||``: the query and the corpus
    rounded to ``score_dtype`` (u each), the output rounded (u), float32 accumulation over ``dim`` terms
    (``dim · 2^-24``), times 2 for safety. 0 for float32 (the reference itself). Reduced-precision (fp16/bf16)
    split-K reductions are switched off while :func:`streamed_search` runs on CUDA, so the accumulation is fp32."""
    u = _UNIT_ROUNDOFF[score_dtype]
    return 0.0 if u == 0 else 2.0 * (3 * u + dim * 2.0**-24)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rescore(q32: torch.Tensor, rows: torch.Tensor, qi: torch.Tensor, ri: torch.Tensor, chunk: int) -> torch.Tensor:
    """Float32 inner products of ``q32[qi[j]]`` with ``rows[ri[j]]`` (stored dtype, upcast) → ``[m]``; chunked so at
    most ``chunk`` vector elements are gathered at a time."""
    import torch

    d = q32.shape[1]
    step = max(1, chunk // max(d, 1))
    out = torch.empty(qi.shape[0], dtype=torch.float32, device=q32.device)  # [m]
    for lo in range(0, qi.shape[0], step):
        a, b = qi[lo : lo + step], ri[lo : lo + step]
        out[lo : lo + step] = (q32[a] * rows[b].float()).sum(dim=1)  # [step, d] -> [step]
    return out


class _Running:
    """Running exact top-k of a scan: best scores/rows so far, the ceiling's removals, the merge of each block."""

    def __init__(self, nq: int, k: int, device: torch.device) -> None:
        import torch

        self.k = k
        self.best_s = torch.full((nq, 0), -float("inf"), dtype=torch.float32, device=device)  # [nq, <= k]
        self.best_i = torch.full((nq, 0), MISSING_ID, dtype=torch.int64, device=device)  # [nq, <= k]
        self.above = torch.zeros(nq, dtype=torch.int64, device=device)  # [nq]

    def merge(self, block: torch.Tensor, lo: int) -> None:
        """Fold exact scores ``block [nq, r]`` of rows ``lo..lo+r`` (-inf = excluded) into the running top-k."""
        import torch

        vals, idx = _torch_topk_exact(block, min(self.k, block.shape[1]))
        # earlier blocks hold smaller rows: a stable sort of [best | block] keeps the tie rule
        cat_s = torch.cat([self.best_s, vals], dim=1)  # [nq, <= 2k]
        cat_i = torch.cat([self.best_i, idx + lo], dim=1)
        cat_s, order = torch.sort(cat_s, dim=1, descending=True, stable=True)
        self.best_s, self.best_i = cat_s[:, : self.k], cat_i.gather(1, order)[:, : self.k]

    def kth_bound(self, extra: torch.Tensor) -> torch.Tensor:
        """``[nq, 1]``: the k-th best of the running scores and ``extra [nq, m]`` (exact scores of other allowed
        rows), -inf when fewer than k: a lower bound on the final k-th score."""
        import torch

        pool = torch.cat([self.best_s, extra], dim=1)  # [nq, <= k + m]
        if self.k == 0:  # nothing to rank: only the ceiling's `near` rows need a re-score
            return torch.full((pool.shape[0], 1), float("inf"), device=pool.device)
        if pool.shape[1] < self.k:
            return torch.full((pool.shape[0], 1), -float("inf"), device=pool.device)
        return torch.topk(pool, self.k, dim=1).values[:, -1:]


def _approx_block(s: torch.Tensor, rows: torch.Tensor, q32: torch.Tensor, eps: torch.Tensor,
                  ct: torch.Tensor | None, run: _Running, count: bool, chunk: int) -> torch.Tensor:
    """Approximate scores ``s [nq, r]`` (low-precision GEMM, each within ``eps [nq, 1]`` of float32) → exact float32
    scores ``[nq, r]`` of every row that can still reach the final top-k or sits near the ceiling, -inf elsewhere
    and at rows ``>= ceiling`` (counted into ``run.above``).

    Why this is exact: a row whose approximate score is ``>= ceiling + eps`` is surely above the ceiling, one below
    ``ceiling - eps`` surely below; the rows in between are re-scored. The block's approximate top-k of the surely
    allowed rows, re-scored and pooled with the running list, gives ``lb`` <= the final k-th exact score; a row in
    the final top-k has an exact score ``>= lb``, so an approximate one ``>= lb - eps``: those rows are re-scored."""
    import torch

    neg = -float("inf")
    safe, near = s, None
    if ct is not None:
        sure = s >= ct + eps  # [nq, r] surely >= ceiling
        near = (s >= ct - eps) & ~sure  # [nq, r] decided by the re-score
        if count:
            run.above += sure.sum(dim=1)
        s = s.masked_fill(sure, neg)
        safe = s.masked_fill(near, neg)
    top_v, top_i = torch.topk(safe, min(run.k, s.shape[1]), dim=1)  # [nq, kk] surely allowed, approximate
    qa = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(top_i)
    ex_a = _rescore(q32, rows, qa.reshape(-1), top_i.reshape(-1), chunk).view(top_i.shape)
    ex_a = ex_a.masked_fill(torch.isneginf(top_v), neg)  # [nq, kk]
    lb = run.kth_bound(ex_a)  # [nq, 1]
    want = (s > neg) & (s >= lb - eps)  # [nq, r]; every `near` row too (lb < ceiling), made explicit:
    if near is not None:
        want |= near
    qi, ri = want.nonzero(as_tuple=True)
    exact = torch.full_like(s, neg)  # [nq, r]
    exact[qi, ri] = _rescore(q32, rows, qi, ri, chunk)
    if ct is not None:
        over = exact >= ct  # only `near` rows can be over here
        if count:
            run.above += over.sum(dim=1)
        exact = exact.masked_fill(over, neg)
    return exact


def streamed_search(
    corpus: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int,
    ceilings: np.ndarray | None = None,
    *,
    block_rows: int | None = None,
    device: str | torch.device | None = None,
    score_dtype: torch.dtype | None = None,
    max_block_elems: int | None = None,
    return_above: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ceiling-aware top-k of ``queries [nq, d]`` over ``corpus [nd, d]`` kept in its storage dtype
    (float32/float16, or a bfloat16 tensor) wherever it lives, streamed through ``device`` in blocks.

    Same results and tie rule as :func:`torch_search` over the corpus upcast to float32 — "exact" means exact
    against the *stored* vectors (a float16 corpus is searched as the float16 values it holds, not as the float32
    embeddings it was rounded from), up to float32 summation order (bit-equal where the sums are exact).

    - ``block_rows``: rows moved to ``device`` at a time (the shard's memory budget there; ``None``: all at once,
      no copy when the corpus is already there). Only one block and its score temporaries are on the device.
    - ``score_dtype``: the GEMM's dtype; default the corpus' dtype on CUDA (fp16/bf16 tensor cores), float32
      elsewhere (each block upcast on the fly, no float32 copy of the corpus). Below float32, every score that
      can matter — near the running k-th score or near the ceiling — is re-scored in float32 against the stored
      vectors (:func:`_approx_block`), so the ranking, the scores and ``above`` equal the float32 search.
    - ``max_block_elems``: scores per GEMM block ``[nq, rows]`` (``None``: :func:`default_block_elems`).
    Returns ``(scores [nq,k] float32, rows [nq,k] int64)`` (+ ``above [nq] int64`` with ``return_above``)."""
    import torch

    if isinstance(queries, np.ndarray) and not queries.flags.writeable:
        queries = queries.copy()  # e.g. from Ray's object store; small, and torch wants writable memory
    cor = torch.as_tensor(corpus)
    dev = torch.device(device) if device is not None else cor.device
    sd = score_dtype or (cor.dtype if dev.type == "cuda" else torch.float32)
    q32 = torch.as_tensor(queries).to(device=dev, dtype=torch.float32)  # [nq, d]
    if q32.ndim != 2 or cor.ndim != 2 or q32.shape[1] != cor.shape[1]:
        raise ValueError(f"queries {tuple(q32.shape)} and corpus {tuple(cor.shape)} must be [nq,d] and [nd,d]")
    nq, nd, d = q32.shape[0], cor.shape[0], q32.shape[1]
    c = _check_ceilings(ceilings, nq)
    count = return_above and c is not None and not np.isposinf(c).all()
    if k <= 0 and not count:
        empty = (np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64))
        return (*empty, np.zeros(nq, np.int64)) if return_above else empty
    k = max(k, 0)
    if max_block_elems is None:
        max_block_elems = default_block_elems(dev)
    ct = None if c is None else torch.from_numpy(c).to(dev)[:, None]  # [nq, 1]
    tol = score_tolerance(_dtype_name(sd), d)
    qs = q32.to(sd)  # [nq, d] the queries as the GEMM sees them
    qn = q32.norm(dim=1, keepdim=True)  # [nq, 1]
    rows = max(k, max_block_elems // max(nq, 1), 1)  # GEMM block rows
    step = nd if block_rows is None else max(int(block_rows), 1)  # transfer block rows
    run = _Running(nq, k, dev)
    flags = _exact_reductions(dev)
    try:
        with torch.no_grad():
            for lo in range(0, nd, step):
                part = cor[lo : lo + step].to(dev, non_blocking=True)  # [step, d] stored dtype, on the device
                eps = None
                if tol:
                    cmax = torch.linalg.vector_norm(part, dim=1, dtype=torch.float32).max()
                    eps = tol * qn * cmax  # [nq, 1]
                for slo in range(0, part.shape[0], rows):
                    sub = part[slo : slo + rows]  # [r, d]
                    block = (qs @ sub.to(sd).T).float()  # [nq, r]
                    if eps is None:
                        block = _mask_exact(block, ct, run, count)
                    else:
                        block = _approx_block(block, sub, q32, eps, ct, run, count, max_block_elems)
                    if k:
                        run.merge(block, lo + slo)
    finally:
        _restore_reductions(flags)
    vals = run.best_s.cpu().numpy().astype(np.float32)
    ids = run.best_i.cpu().numpy().astype(np.int64)
    ids[np.isneginf(vals)] = MISSING_ID
    vals, ids = _pad(vals, ids, k)
    return (vals, ids, run.above.cpu().numpy().astype(np.int64)) if return_above else (vals, ids)


def _mask_exact(block: torch.Tensor, ct: torch.Tensor | None, run: _Running, count: bool) -> torch.Tensor:
    """Float32 scores ``[nq, r]``: entries ``>= ceiling`` to -inf (counted into ``run.above``)."""
    if ct is None:
        return block
    over = block >= ct  # [nq, r]
    if count:
        run.above += over.sum(dim=1)
    return block.masked_fill(over, -float("inf"))


def _exact_reductions(dev: torch.device) -> tuple[bool, bool] | None:
    """Switch cuBLAS' reduced-precision (fp16/bf16) split-K reductions off, so low-precision GEMMs accumulate in
    fp32 (what :func:`score_tolerance` assumes); returns the old flags."""
    import torch

    if dev.type != "cuda":
        return None
    m = torch.backends.cuda.matmul
    old = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    return old


def _restore_reductions(old: tuple[bool, bool] | None) -> None:
    import torch

    if old is not None:
        m = torch.backends.cuda.matmul
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = old
