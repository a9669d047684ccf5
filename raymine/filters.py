"""Positive-aware negative filters of NV-Retriever (arXiv 2407.15831), pure numpy.

A batch of queries is a set of padded 2-D arrays, one row per query, best candidate first:
``cand_ids [nq, K]``, ``scores [nq, K]`` (descending) and ``keep [nq, K]`` (False on padding).
Every filter takes the current keep-mask and returns ``(new_keep, dropped_count)`` where the
count is the candidates this filter removed that were still kept before it — so the counts of
filters applied in sequence add up and each drop is explained exactly once.

The per-query anchor ``pos`` is a reduction (min by default, like NVIDIA's code) of *that
query's own* positive scores; queries may have any number of positives (sentence-transformers'
margin code takes the wrong positive when the counts differ) and scores may be negative.

PercPos sign-safe rule (documented choice)::

    ceiling = pos - |pos| * (1 - perc)      # = pos * perc for pos >= 0, pos * (2 - perc) for pos < 0

so the ceiling is always <= pos (strictly below for pos != 0, perc < 1) and moves away from the
positive by the same relative amount whatever the sign; for pos = 0 the ceiling is 0. The naive
``pos * perc`` would put the ceiling *above* a negative positive score and admit candidates the
teacher rates higher than the positive.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from raymine.config import MineConfig

log = logging.getLogger(__name__)

#: Filters in the order :func:`apply_filters` applies them; keys of its drop counts.
FILTER_ORDER = ("positive", "excluded", "method")
#: Above this many listed ids per query, id matching switches from broadcasting to sorted keys.
_BROADCAST_MAX_LISTED = 16


# ------------------------------------------------------------------------------------------------
# Anchors and ceilings
# ------------------------------------------------------------------------------------------------
def reduce_positive_scores(pos_scores: Sequence[np.ndarray], how: str = "min") -> np.ndarray:
    """One anchor per query from its own positive scores (NaNs ignored); NaN when it has none.

    ``pos_scores``: one 1-D array per query, any lengths. Returns float32 ``[nq]``.
    """
    lengths = np.array([np.size(s) for s in pos_scores], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in pos_scores]) if len(pos_scores) else np.zeros(0, np.float32)
    return reduce_positive_flat(flat, lengths, how)


def reduce_positive_flat(values: np.ndarray, lengths: np.ndarray, how: str = "min") -> np.ndarray:
    """:func:`reduce_positive_scores` on Arrow's layout: flat scores ``[sum(lengths)]`` + lengths ``[nq]``."""
    if how not in ("min", "mean", "max"):
        raise ValueError(f"pos_reduce: {how!r} is not one of ['min', 'mean', 'max']")
    values = np.asarray(values, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    nq = len(lengths)
    ok = ~np.isnan(values)
    row = np.repeat(np.arange(nq), lengths)  # [n values] query of each score
    count = np.bincount(row[ok], minlength=nq)
    if how == "mean":
        out = np.bincount(row[ok], weights=values[ok], minlength=nq) / np.maximum(count, 1)
    else:
        out = np.full(nq, np.inf if how == "min" else -np.inf)
        (np.minimum if how == "min" else np.maximum).at(out, row[ok], values[ok])
    out = out.astype(np.float32)
    out[count == 0] = np.nan
    return out


def percpos_ceiling(pos: np.ndarray, perc: float) -> np.ndarray:
    """Sign-safe PercPos ceiling ``pos - |pos| * (1 - perc)`` (see module docstring)."""
    pos = np.asarray(pos, dtype=np.float32)
    return (pos - np.abs(pos) * np.float32(1.0 - perc)).astype(np.float32)


def marginpos_ceiling(pos: np.ndarray, margin: float) -> np.ndarray:
    """MarginPos ceiling ``pos - margin``."""
    return (np.asarray(pos, dtype=np.float32) - np.float32(margin)).astype(np.float32)


def ceiling_from_anchor(cfg: MineConfig, pos: np.ndarray) -> np.ndarray:
    """Per-query ceiling from already reduced anchors; NaN anchors give NaN ceilings (every method)."""
    pos = np.asarray(pos, dtype=np.float32)
    if cfg.method in ("naive", "shifted"):
        out = np.full(pos.shape, np.inf, dtype=np.float32)
    elif cfg.method == "abs":
        out = np.full(pos.shape, cfg.abs_threshold, dtype=np.float32)
    elif cfg.method == "marginpos":
        out = marginpos_ceiling(pos, cfg.margin)
    elif cfg.method == "percpos":
        out = percpos_ceiling(pos, cfg.perc)
    else:
        raise ValueError(f"mine.method: unknown method {cfg.method!r}")
    out[np.isnan(pos)] = np.nan
    return out


def score_ceiling(cfg: MineConfig, pos_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Per-query score ceiling float32 ``[nq]``: a negative must score strictly below it.

    naive/shifted: +inf; abs: ``abs_threshold``; marginpos: ``pos - margin``; percpos: sign-safe
    ``pos * perc``. pos = ``reduce(pos_scores, cfg.pos_reduce)``. A query with no positive score
    (empty or all NaN) gets NaN for *every* method: it has no scorable positive, so it cannot be a
    training row, and dropping it for every method keeps the query sets of methods comparable; the
    mining stage drops it with reason ``no_positive_score``.
    """
    return ceiling_from_anchor(cfg, reduce_positive_scores(pos_scores, cfg.pos_reduce))


def required_depth(cfg: MineConfig, num_excluded: int) -> int:
    """Candidates one query's search must return so that enough survive mining.

    ``num_excluded``: that query's positives + excluded ids (they may appear among the candidates).
    top: ``num_negatives``; sampled/top1_sampled: ``max(num_negatives, sample_top_k)``; shifted adds
    ``shift``. Ceiling methods need no extra depth when the search applies the ceiling. The search
    stage adds ``SearchConfig.depth_slack`` on top.
    """
    pool = cfg.num_negatives if cfg.sampling == "top" else max(cfg.num_negatives, cfg.sample_top_k)
    shift = cfg.shift if cfg.method == "shifted" else 0
    return int(shift + pool + max(0, int(num_excluded)))


# ------------------------------------------------------------------------------------------------
# Filters: (keep_in) -> (keep_out, dropped_count)
# ------------------------------------------------------------------------------------------------
def _dropped(keep_in: np.ndarray, keep_out: np.ndarray) -> int:
    return int(np.count_nonzero(keep_in & ~keep_out))


def drop_listed(
    cand_ids: np.ndarray, keep: np.ndarray, listed_ids: np.ndarray, listed_valid: np.ndarray
) -> tuple[np.ndarray, int]:
    """Drop candidates whose id is in *the same query's* list (padded ``[nq, P]`` + valid mask).

    Exact per row whatever the list lengths; ids may be integer codes or strings.
    """
    nq, k = cand_ids.shape
    if listed_ids.shape[0] != nq:
        raise ValueError(f"listed ids have {listed_ids.shape[0]} rows, candidates {nq}")
    p = listed_ids.shape[1] if listed_ids.ndim == 2 else 0
    if p == 0 or k == 0 or not listed_valid.any():
        return keep.copy(), 0
    if p <= _BROADCAST_MAX_LISTED:
        hit = np.zeros(cand_ids.shape, dtype=bool)  # [nq, K]; one [nq, K] pass per listed column
        for j in range(p):
            hit |= (cand_ids == listed_ids[:, j: j + 1]) & listed_valid[:, j: j + 1]
    else:  # many ids in some query: match (row, id) keys by sorting instead of an [nq, K, P] cube
        if not np.issubdtype(cand_ids.dtype, np.integer):
            _, codes = np.unique(np.concatenate([cand_ids.ravel(), listed_ids.ravel()]), return_inverse=True)
            cand_codes = codes[: cand_ids.size].reshape(cand_ids.shape)
            listed_codes = codes[cand_ids.size :].reshape(listed_ids.shape)
        else:
            cand_codes, listed_codes = cand_ids, listed_ids
        span = int(max(cand_codes.max(initial=0), listed_codes.max(initial=0))) + 1
        rows = np.arange(nq, dtype=np.int64)[:, None]
        cand_keys = rows * span + cand_codes.astype(np.int64)  # [nq, K]
        listed_keys = (rows * span + listed_codes.astype(np.int64))[listed_valid]  # [n listed]
        hit = np.isin(cand_keys, listed_keys)
    out = keep & ~hit
    return out, _dropped(keep, out)


def drop_positives(
    cand_ids: np.ndarray, keep: np.ndarray, positive_ids: np.ndarray, positive_valid: np.ndarray
) -> tuple[np.ndarray, int]:
    """Never return a labelled positive: drop candidates equal to one of the query's positive ids."""
    return drop_listed(cand_ids, keep, positive_ids, positive_valid)


def drop_excluded(
    cand_ids: np.ndarray, keep: np.ndarray, excluded_ids: np.ndarray, excluded_valid: np.ndarray
) -> tuple[np.ndarray, int]:
    """Drop candidates listed as excluded for the query (texts identical to one of its positives)."""
    return drop_listed(cand_ids, keep, excluded_ids, excluded_valid)


def shift_filter(keep: np.ndarray, shift: int) -> tuple[np.ndarray, int]:
    """Top-k shifted by N: skip each query's first ``shift`` candidates still kept.

    Ranks count only candidates that survived the positive/excluded filters, so a positive at
    rank 0 does not use up one of the N skipped places.
    """
    rank = np.cumsum(keep, axis=1, dtype=np.int32) - 1  # [nq, K] rank among kept
    out = keep & (rank >= shift)
    return out, _dropped(keep, out)


def ceiling_filter(scores: np.ndarray, keep: np.ndarray, ceiling: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep candidates scoring strictly below their query's ceiling (``[nq]``; NaN drops all)."""
    out = keep & (scores < np.asarray(ceiling, dtype=np.float32)[:, None])
    return out, _dropped(keep, out)


def abs_filter(scores: np.ndarray, keep: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """TopK-Abs: keep score < threshold."""
    out = keep & (scores < np.float32(threshold))
    return out, _dropped(keep, out)


def marginpos_filter(scores: np.ndarray, keep: np.ndarray, pos: np.ndarray, margin: float) -> tuple[np.ndarray, int]:
    """TopK-MarginPos: keep score < pos - margin (pos per query ``[nq]``)."""
    return ceiling_filter(scores, keep, marginpos_ceiling(pos, margin))


def percpos_filter(scores: np.ndarray, keep: np.ndarray, pos: np.ndarray, perc: float) -> tuple[np.ndarray, int]:
    """TopK-PercPos: keep score < sign-safe pos * perc (pos per query ``[nq]``)."""
    return ceiling_filter(scores, keep, percpos_ceiling(pos, perc))


def method_filter(cfg: MineConfig, scores: np.ndarray, keep: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, int]:
    """The configured method's filter (naive keeps everything)."""
    if cfg.method == "naive":
        return keep.copy(), 0
    if cfg.method == "shifted":
        return shift_filter(keep, cfg.shift)
    if cfg.method == "abs":
        return abs_filter(scores, keep, cfg.abs_threshold)
    if cfg.method == "marginpos":
        return marginpos_filter(scores, keep, pos, cfg.margin)
    if cfg.method == "percpos":
        return percpos_filter(scores, keep, pos, cfg.perc)
    raise ValueError(f"mine.method: unknown method {cfg.method!r}")


def method_label(cfg: MineConfig) -> str:
    """Short method name with its parameter, e.g. ``percpos(0.95)``."""
    param = {"naive": None, "shifted": cfg.shift, "abs": cfg.abs_threshold, "marginpos": cfg.margin,
             "percpos": cfg.perc}[cfg.method]
    return cfg.method if param is None else f"{cfg.method}({param:g})"


def apply_filters(
    cfg: MineConfig,
    cand_ids: np.ndarray,
    scores: np.ndarray,
    valid: np.ndarray,
    positive_ids: np.ndarray,
    positive_valid: np.ndarray,
    excluded_ids: np.ndarray,
    excluded_valid: np.ndarray,
    pos: np.ndarray,
) -> tuple[np.ndarray, dict[str, int]]:
    """Positives by id, excluded ids, then the method; returns the keep-mask ``[nq, K]`` and drop counts."""
    keep, d_pos = drop_positives(cand_ids, valid, positive_ids, positive_valid)
    d_exc = 0
    if cfg.exclude_identical_text:
        keep, d_exc = drop_excluded(cand_ids, keep, excluded_ids, excluded_valid)
    keep, d_method = method_filter(cfg, scores, keep, pos)
    return keep, {"positive": d_pos, "excluded": d_exc, "method": d_method}
