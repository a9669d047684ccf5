"""Mining stage: positive-aware filters -> sampling per teacher -> teacher ensembling, on Ray Data.

Input: one candidates table per teacher (search stage output, see ``columns``) and the queries table.
Teachers are joined by query id with Ray Data ``Dataset.join`` (full outer: a query missing from one
teacher is still mined from the others), the query text with a left outer join; no table is
collected on the driver. :func:`mine_batch` (pure pyarrow + numpy, no Ray) does the work per batch,
so the result does not depend on batch boundaries or worker counts.

:func:`mine_batch` is vectorised over the batch (no per-query Python): each teacher's lists become
padded ``[nq, K]`` arrays; ids listed for a query (positives, excluded) are matched exactly — an 8-bit
fingerprint of each string (length + last two bytes, read from the Arrow buffers) picks the few
candidates that might equal one of their own query's listed ids, and ``pyarrow.compute.index_in``
decides those by value; sampling works on a window of each row's first kept candidates; teachers are
combined with ``ensemble.ensemble_arrays``. ``tests/test_mine.py`` checks it against a per-query
reference for every method, sampling mode and ensemble.

Output under ``out_uri``: ``mined/`` (``MINED_COLUMNS`` + ``NUM_SHORT``), ``dropped/`` (``QUERY_ID,
REASON`` [+ ``TEACHER`` when not ensembling]) — every input query is in exactly one of them —
``report.json``, ``scores.png`` and the stage manifest. Short queries are reported, never padded with
random passages. Runs written before the ``dropped/`` folder have one ``dropped.parquet`` file; the
manifest's ``dropped`` names whichever the run wrote, and ``raymine.parts`` reads a file or a folder.

Off the driver (scale rule): each mining task writes its batch's mined and dropped rows as one part of
each folder (named by a hash of the batch's output keys, so a retried task rewrites the same parts) and
returns a one-row summary: counts per reason and per filter, a histogram of the search's above-ceiling
counts, and a bounded, hash-drawn sample of scores for the plot. The driver sums those summaries; it
never holds a per-query array. Accounting is checked from counts (every joined row mined or dropped
with a known reason), and Ray tasks read the written parts' key columns back to check that every key
is there exactly once (a duplicated input query id repeats keys).

Score columns: each negative's score is from the teacher that contributed it; after ensembling,
``POSITIVE_IDS``/``POSITIVE_SCORES`` are those of the first contributing teacher (teachers' scales
differ, e.g. BM25 vs cosine, so scores of an ensembled row are not comparable across teachers).
The ``CEILING`` column written by the search is not trusted: the ceiling is recomputed from the
positive scores and this stage's config.

Drops inside the search: a positive-aware ceiling is applied in the search itself (exact masked
scan), so candidates over it never reach ``F.method_filter`` here and ``drop_method`` stays near 0.
The search counts them instead (``ABOVE_CEILING``: corpus docs scoring >= the query's ceiling); the
report gives, per teacher, ``above_ceiling`` (sum over queries), ``above_ceiling_median`` (per
query) and ``above_ceiling_queries`` (queries with a count). The count includes the query's
positives (and excluded ids) that score over the ceiling, so it bounds the method's removals of
would-be negatives from above; it is exact for Flat and BM25 and a lower bound for IVF/PQ. Tables
written before the column existed are still read; their teacher reports ``None``.

Drop reasons: ``unknown_query`` (id not in the queries table), ``no_positive_score`` (no teacher
has a score for any of the query's positives), ``no_negatives`` (every candidate was filtered out).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raymine import columns as C
from raymine import ensemble as E
from raymine import filters as F
from raymine import joins, parts, storage
from raymine import sampling as S
from raymine.config import MineConfig, to_dict

log = logging.getLogger(__name__)

_IN_COLS = (C.POSITIVE_IDS, C.POSITIVE_SCORES, C.EXCLUDED_IDS, C.CANDIDATE_IDS, C.CANDIDATE_SCORES)
_FULL_POS = "_full_positive_ids"
_REASON = "_reason"
_REASONS = pa.array(["unknown_query", "no_positive_score", "no_negatives"], pa.string())
_STATS = ("present", "no_positive_score", "seen", "drop_positive", "drop_excluded", "drop_method", "kept",
          "requested", "delivered", "known_fn")
_HISTS = ("positive", "kept", "dropped")
_DROPPED_SAMPLE_PER_QUERY = 16  # method-dropped scores kept per query for the histogram


def _tcol(col: str, teacher: str) -> str:
    return f"{col}@{teacher}"


# ------------------------------------------------------------------------------------------------
# Arrow helpers
# ------------------------------------------------------------------------------------------------
def _lengths(col: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _combine(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # one chunk: no copy
    return col


def _flat_strings(col: pa.Array) -> pa.Array:
    """The list column's values (null lists skipped) as a plain ``string`` array."""
    flat = col.flatten()
    return flat if flat.type == pa.string() else flat.cast(pa.string())


def _flat_floats(col: pa.Array) -> np.ndarray:
    """The list column's values as float32 (null values -> NaN)."""
    flat = col.flatten()
    if flat.null_count:
        flat = pc.fill_null(flat.cast(pa.float32()), np.nan)
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _fingerprint(arr: pa.Array) -> np.ndarray:
    """8-bit fingerprint uint8 ``[n]`` of each string from its length and last two bytes (equal strings,
    equal fingerprints); a cheap pre-filter so that only a few candidates are looked up by exact value."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint8)
    off = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + n + 1]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    if len(data) < 8:
        data = np.concatenate([data, np.zeros(8, np.uint8)])
    end = off[1:]
    ln = end - off[:-1]  # [n] int32
    key = ln.view(np.uint32) + np.left_shift(data[end - 1], 8, dtype=np.uint32)  # end - 1 >= -1: a valid index
    key += np.left_shift(data[end - 2], 16, dtype=np.uint32)
    short = np.nonzero(ln < 2)[0]  # bytes before the string's start must not count
    if short.size:
        one = ln[short] == 1
        key[short] = np.where(one, 1 + (data[np.where(one, end[short] - 1, 0)].astype(np.uint32) << np.uint32(8)), 0)
    key *= np.uint32(0x9E3779B1)
    key >>= np.uint32(24)
    return key.astype(np.uint8)


def _row_listing(lens: np.ndarray) -> np.ndarray:
    """Flat indices of each row's values ``[nq, max(lens)]`` (-1 padded) from per-row lengths."""
    width = max(1, int(lens.max(initial=0)))
    col = np.arange(width)[None, :]
    return np.where(col < lens[:, None], (np.cumsum(lens) - lens)[:, None] + col, -1)


def _listed_hits(cand: pa.Array, fp: np.ndarray, starts: np.ndarray, in_row: np.ndarray | None,
                 listed: list[tuple[pa.Array, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each listed-id column (flat strings + lengths per query): the candidates (row, column) that equal
    an id listed for *their own* query. ``fp [nq, K]``: candidates' fingerprints (``in_row``: which are
    real, None = all). Exact: fingerprints pair a candidate with the few listed ids it might equal, and
    those pairs are compared by value."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    hits = [empty for _ in listed]
    if not len(cand):
        return hits
    live = []
    maybe = None
    for i, (flat, lens) in enumerate(listed):
        if not len(flat):
            continue
        lidx = _row_listing(lens)  # [nq, P] flat index of each listed id, -1 padded
        lfp = np.where(lidx >= 0, _fingerprint(flat)[np.maximum(lidx, 0)], 0).astype(np.uint8)  # [nq, P]
        live.append((i, flat, lidx, lfp))
        for j in range(lidx.shape[1]):  # one [nq, K] compare per listed column
            eq = fp == lfp[:, j: j + 1]
            maybe = eq if maybe is None else np.bitwise_or(maybe, eq, out=maybe)
    if maybe is None:
        return hits
    r, c = np.nonzero(maybe if in_row is None else maybe & in_row)  # [n maybe]
    if not r.size:
        return hits
    fpc = fp[r, c][:, None]  # [n maybe, 1]
    for i, flat, lidx, lfp in live:
        s, j = np.nonzero((fpc == lfp[r]) & (lidx[r] >= 0))  # [n pairs] same fingerprint, row-major
        same = pc.equal(cand.take(pa.array(starts[r[s]] + c[s], pa.int64())),
                        flat.take(pa.array(lidx[r[s], j], pa.int64())))
        s = s[pc.fill_null(same, False).to_numpy(zero_copy_only=False)]
        s = s[np.concatenate([[True], s[1:] != s[:-1]])] if s.size else s  # sorted: drop repeats
        hits[i] = (r[s], c[s])
    return hits


def _first_true(mask: np.ndarray, count: np.ndarray, width: int) -> np.ndarray:
    """Columns of each row's first ``width`` True entries ``[nq, width]`` (-1 padded); ``count [nq]``: True
    entries per row (an upper bound will do). Scans a window from each row's first True (kept or dropped
    candidates come in runs: a ceiling removes the top of a list), the whole row only where the window
    falls short."""
    nq, k = mask.shape
    idx = np.full((nq, width), -1, np.int64)
    if width <= 0 or not nq or not k:
        return idx
    p = min(k, width + 8)
    start = np.minimum(np.argmax(mask, axis=1), k - p)  # [nq] first True (window kept inside the row)
    if k >= width:  # common case: the run starts at column 0 and has no hole
        head = (start == 0) & mask[:, :width].all(axis=1)
        idx[head] = np.arange(width)
        rows = np.nonzero(~head)[0]
    else:
        rows = np.arange(nq)
    if not rows.size:
        return idx
    cols = start[rows, None] + np.arange(p)[None, :]  # [nr, p]
    sub = mask[rows[:, None], cols]
    rank = np.cumsum(sub, axis=1, dtype=np.int32)  # [nr, p] 1-based rank among True
    r, c = np.nonzero(sub & (rank <= width))
    idx[rows[r], rank[r, c] - 1] = cols[r, c]
    more = rows[np.nonzero(rank[:, -1] < np.minimum(count[rows], width))[0]]  # True entries past the window
    if more.size:
        full, _ = S.gather(mask[more], width)
        idx[more] = full
    return idx


def _count_listed(neg_rows: np.ndarray, neg_vals: pa.Array, fp_rows: np.ndarray, fp_vals: pa.Array) -> np.ndarray:
    """Per value of ``neg_vals``: whether its row's list (``fp_rows``/``fp_vals``) holds it; bool ``[n]``."""
    if not len(neg_vals) or not len(fp_vals):
        return np.zeros(len(neg_vals), bool)
    enc = pc.dictionary_encode(pa.concat_arrays([neg_vals, fp_vals])).indices.to_numpy(
        zero_copy_only=False).astype(np.int64)
    span = int(enc.max()) + 1
    a = neg_rows.astype(np.int64) * span + enc[: len(neg_vals)]
    b = fp_rows.astype(np.int64) * span + enc[len(neg_vals):]
    return np.isin(a, b)


# ------------------------------------------------------------------------------------------------
# One teacher on one batch
# ------------------------------------------------------------------------------------------------
class _Mined:
    """One teacher's filters + sampling on one batch, as padded arrays (no per-query Python)."""

    def __init__(self, cfg: MineConfig, batch: pa.Table, teacher: str, qseeds: np.ndarray, width: int):
        cols = {c: _combine(batch.column(_tcol(c, teacher))) for c in _IN_COLS}
        nq = batch.num_rows
        self.nq = nq
        self.present = pc.is_valid(cols[C.CANDIDATE_IDS]).to_numpy(zero_copy_only=False)  # [nq]
        cl = _lengths(cols[C.CANDIDATE_IDS])
        if (cl != _lengths(cols[C.CANDIDATE_SCORES])).any():
            raise ValueError(f"teacher {teacher}: candidate ids and scores differ in length for some query")
        # anchors from the query's own positive scores (±inf counts as missing)
        psl = _lengths(cols[C.POSITIVE_SCORES])
        pos_flat = _flat_floats(cols[C.POSITIVE_SCORES])
        pos_flat = np.where(np.isinf(pos_flat), np.float32(np.nan), pos_flat)
        self.anchor = F.reduce_positive_flat(pos_flat, psl, cfg.pos_reduce)  # [nq]
        self.no_pos = self.present & np.isnan(self.anchor)
        usable = self.present & ~self.no_pos
        self.usable = usable
        # padded candidates [nq, K]
        k = max(1, int(cl.max(initial=0)))
        self.k = k
        self.starts = np.cumsum(cl) - cl  # [nq] first flat index of each row
        self.cand = _flat_strings(cols[C.CANDIDATE_IDS])  # [n cand]
        sc_flat = _flat_floats(cols[C.CANDIDATE_SCORES])
        listed = [(_flat_strings(cols[C.POSITIVE_IDS]), _lengths(cols[C.POSITIVE_IDS]))]
        if cfg.exclude_identical_text:
            listed.append((_flat_strings(cols[C.EXCLUDED_IDS]), _lengths(cols[C.EXCLUDED_IDS])))
        any_listed = any(len(f) for f, _ in listed)
        fp_flat = _fingerprint(self.cand) if any_listed else np.zeros(len(self.cand), np.uint8)
        if nq and (cl == k).all():  # every row has K candidates: reshape, no copy
            in_row = None
            scores = sc_flat.reshape(nq, k)
            fp = fp_flat.reshape(nq, k)
            valid = np.repeat(usable[:, None], k, axis=1)
        else:
            in_row = np.arange(k)[None, :] < cl[:, None]  # [nq, K]
            at = np.where(in_row, self.starts[:, None] + np.arange(k)[None, :], 0)
            scores = np.where(in_row, sc_flat[at], np.float32(-np.inf)) if sc_flat.size else \
                np.full((nq, k), -np.inf, np.float32)
            fp = fp_flat[at] if fp_flat.size else np.zeros((nq, k), np.uint8)
            valid = in_row & usable[:, None]
        self.scores = scores.astype(np.float32, copy=False)
        # positives and excluded ids, by exact value within the query
        hits = _listed_hits(self.cand, fp, self.starts, in_row, listed)
        k1 = valid
        drops = []
        for r, c in hits:  # positives first, then excluded ids: each drop explained once
            ok = k1[r, c]
            k1[r[ok], c[ok]] = False
            drops.append(np.bincount(r[ok], minlength=nq))
        drop_pos = drops[0]
        drop_exc = drops[1] if len(drops) > 1 else np.zeros(nq, np.int64)
        n1 = np.where(usable, cl, 0) - drop_pos - drop_exc
        if cfg.method == "naive":
            k2 = k1
        elif cfg.method == "shifted":
            k2, _ = F.shift_filter(k1, cfg.shift)
        else:  # abs / marginpos / percpos: strictly below the query's ceiling
            k2 = k1 & (self.scores < F.ceiling_from_anchor(cfg, self.anchor)[:, None])
        self.kept = k2.view(np.uint8).sum(axis=1, dtype=np.int64)  # [nq] length of the ordered list
        # the first `width` kept (rank order) and the sample among them
        idx = _first_true(k2, self.kept, width)  # [nq, W] columns, -1 padded
        okw = idx >= 0
        rows = np.arange(nq)[:, None]
        win_scores = np.where(okw, self.scores[rows, np.maximum(idx, 0)], np.float32(-np.inf))
        seeds = S.teacher_seeds(qseeds, teacher) if cfg.sampling != "top" else qseeds
        chosen = S.sample_window(cfg, win_scores, okw, seeds)  # [nq, W]
        self.delivered = np.count_nonzero(chosen, axis=1)
        # ordered list: chosen first, then the other kept, both in rank order
        order = np.argsort(np.where(chosen, 0, np.where(okw, 1, 2)).astype(np.int8), axis=1, kind="stable")
        self.ord_col = np.take_along_axis(idx, order, axis=1)  # [nq, W] column of list entry j (-1 past end)
        self.k2, self.win_idx, self.chosen = k2, idx, chosen
        # report statistics
        dm = n1 - self.kept
        self.stats: dict[str, np.ndarray] = {
            "present": self.present.astype(np.int64), "no_positive_score": self.no_pos.astype(np.int64),
            "seen": np.where(usable, cl, 0), "drop_positive": drop_pos, "drop_excluded": drop_exc,
            "drop_method": dm, "kept": self.kept, "requested": np.where(usable, cfg.num_negatives, 0),
            "delivered": self.delivered, "known_fn": np.zeros(nq, np.int64),
        }
        ac = _tcol(C.ABOVE_CEILING, teacher)
        if ac in batch.column_names:
            col = _combine(batch.column(ac))
            self.above = np.where(self.present & pc.is_valid(col).to_numpy(zero_copy_only=False),
                                  pc.fill_null(col, -1).to_numpy(zero_copy_only=False), -1).astype(np.int64)
        else:
            self.above = np.full(nq, -1, np.int64)
        # histogram samples per query: flat values + lengths
        fin = np.isfinite(pos_flat)
        prow = np.repeat(np.arange(nq), psl)
        self.hist = {"positive": (pos_flat[fin], np.bincount(prow[fin], minlength=nq))}
        cr, cc = np.nonzero(chosen)
        ks = self.scores[cr, idx[cr, cc]]
        kf = np.isfinite(ks)
        self.hist["kept"] = (ks[kf], np.bincount(cr[kf], minlength=nq))
        dvals, dlens = np.zeros(0, np.float32), np.zeros(nq, np.int64)
        if dm.any():
            if cfg.method in ("naive", "shifted"):
                md = k1 & ~k2
                md &= ~np.isnan(self.scores)
            else:  # dropped by the ceiling with a score (NaN scores are dropped but not sampled)
                md = k1 & (self.scores >= F.ceiling_from_anchor(cfg, self.anchor)[:, None])
            di = _first_true(md, dm, _DROPPED_SAMPLE_PER_QUERY)  # dm >= the row's count: enough to scan
            dr, dc = np.nonzero(di >= 0)  # [nq, 16] first method-dropped per row
            v = self.scores[dr, di[dr, dc]]
            f = np.isfinite(v)
            dvals = v[f]
            dlens = np.bincount(dr[f], minlength=nq)
        self.hist["dropped"] = (dvals, dlens)
        self.positive_ids = cols[C.POSITIVE_IDS]
        self.positive_scores = cols[C.POSITIVE_SCORES]

    def full_order(self, rows: np.ndarray) -> np.ndarray:
        """The whole ordered list (chosen, then the other kept) of some rows: columns ``[len(rows), K]``."""
        ch = np.zeros((len(rows), self.k), bool)
        r, c = np.nonzero(self.chosen[rows])
        ch[r, self.win_idx[rows][r, c]] = True
        keep = self.k2[rows]
        order = np.argsort(np.where(ch, 0, np.where(keep, 1, 2)).astype(np.int8), axis=1, kind="stable")
        return np.where(np.take_along_axis(keep, order, axis=1), order, -1)


def _list_array(offsets_from: np.ndarray, values: pa.Array, null: np.ndarray | None = None) -> pa.Array:
    """ListArray from per-row lengths ``[n]`` and flat values; rows in ``null`` are null."""
    off = np.zeros(len(offsets_from) + 1, np.int32)
    np.cumsum(offsets_from, out=off[1:])
    mask = None if null is None or not null.any() else pa.array(null)
    return pa.ListArray.from_arrays(pa.array(off, pa.int32()), values, mask=mask)


def mine_batch(batch: pa.Table, cfg: MineConfig, teachers: list[str], ensemble: bool) -> pa.Table:
    """Mine one joined batch (pure, no Ray). One row per query (``ensemble``) or per (query, teacher).

    Rows with a non-null ``_reason`` are dropped queries; ``_stat@teacher`` / ``_hist@teacher``
    columns carry the report's per-row counts and score samples. Vectorised over the batch: the
    result equals the per-query definitions in ``filters``, ``sampling`` and ``ensemble`` (tested
    against a per-query reference) and does not depend on batch boundaries.
    """
    nq, nt, n = batch.num_rows, len(teachers), cfg.num_negatives
    qids = _combine(batch.column(C.QUERY_ID)).cast(pa.string())
    qtext = _combine(batch.column(C.QUERY)) if C.QUERY in batch.column_names else pa.nulls(nq, pa.string())
    unknown = pc.is_null(qtext).to_numpy(zero_copy_only=False) if nq else np.zeros(0, bool)
    qseeds = S.query_seeds(cfg.seed, qids)
    width = max(S.window_size(cfg), 2 * n if ensemble else n, 1)
    res = [_Mined(cfg, batch, t, qseeds, width) for t in teachers]
    label = f"{F.method_label(cfg)}/{S.sampling_label(cfg)}"
    present = np.stack([r.present for r in res], axis=1) if nq else np.zeros((0, nt), bool)  # [nq, T]
    usable = np.stack([r.usable for r in res], axis=1) if nq else np.zeros((0, nt), bool)

    # output rows: src query, teacher group; picks (teacher, column) [rows, n]
    if ensemble:
        src = np.arange(nq)
        row_t = np.full(nq, -1)
        lens = np.where(usable, np.stack([r.kept for r in res], axis=1) if nq else 0, 0)  # [nq, T]
        u = S.uniforms(qseeds, 1, S.STREAM_TEACHER)[:, 0]
        codes = None
        if cfg.ensemble != "intra_sample_no_dedup" and nt > 1:
            # ids as codes where they decide: every multi-teacher row for dedup; for cross_sample only rows
            # where some teacher has fewer than n (a fill may follow; elsewhere the drawn teacher's n suffice)
            need = usable.sum(axis=1) >= 2
            if cfg.ensemble == "cross_sample":
                need &= (usable & (lens < n)).any(axis=1)
            rows = np.nonzero(need)[0]
            codes = np.full((nq, nt, width), -1, np.int64)
            if rows.size:
                codes[rows] = _window_codes(res, width, rows=rows)
        pt, pp, cnt, redo = E.ensemble_arrays(cfg.ensemble, lens, n, u, codes, present=usable)
        pc_ = np.full(pt.shape, -1, np.int64)  # column in the teacher's padded row
        for ti, r in enumerate(res):
            m = pt == ti
            qi = np.nonzero(m)[0]
            pc_[m] = r.ord_col[qi, pp[m]]
        ri = np.nonzero(redo)[0]
        if ri.size:  # a list with repeated ids needs entries past the window: whole lists for these rows
            fulls = [r.full_order(ri) for r in res]  # [nr, K_t]
            kmax = max(f.shape[1] for f in fulls)
            fcodes = _window_codes(res, kmax, rows=ri, cols=fulls)
            pt2, pp2, cnt2, _ = E.ensemble_arrays(cfg.ensemble, lens[ri], n, u[ri], fcodes, present=usable[ri])
            pt[ri], pp[ri], cnt[ri] = pt2, pp2, cnt2
            pc_[ri] = -1
            for ti in range(nt):
                m = pt2 == ti
                qi = np.nonzero(m)[0]
                pc_[ri[qi], np.nonzero(m)[1]] = fulls[ti][qi, pp2[m]]
        grp_present = present
        any_usable = usable.any(axis=1)
    else:
        src, row_t = np.nonzero(present)  # q-major, teacher order within a query
        pt = np.full((len(src), n), -1, np.int64)
        pc_ = np.full((len(src), n), -1, np.int64)
        cnt = np.zeros(len(src), np.int64)
        for ti, r in enumerate(res):
            m = row_t == ti
            q = src[m]
            cols = r.ord_col[q, :n]  # chosen come first
            got = np.arange(n)[None, :] < r.delivered[q][:, None]
            pt[m] = np.where(got, ti, -1)
            pc_[m] = np.where(got, cols, -1)
            cnt[m] = r.delivered[q]
        grp_present = np.zeros((len(src), nt), bool)
        grp_present[np.arange(len(src)), row_t] = True
        any_usable = usable[src, row_t]
    nrow = len(src)
    reason = np.full(nrow, -1, np.int64)  # index into _REASONS; -1 = mined
    reason[cnt == 0] = 2
    reason[~any_usable] = 1
    reason[unknown[src]] = 0
    mined = reason < 0
    cnt = np.where(mined, cnt, 0)

    # negatives: taken from each teacher's flat candidate ids, then put in output order
    take = (np.arange(n)[None, :] < cnt[:, None]) & (pt >= 0)  # [rows, n]
    rr, jj = np.nonzero(take)
    tt = pt[rr, jj]
    cc = pc_[rr, jj]
    neg_sc = np.zeros(len(rr), np.float32)
    parts, where = [], []
    for ti, r in enumerate(res):
        m = np.nonzero(tt == ti)[0]
        q = src[rr[m]]
        parts.append(r.cand.take(pa.array(r.starts[q] + cc[m], pa.int64())))
        where.append(m)
        neg_sc[m] = r.scores[q, cc[m]]
    inv = np.empty(len(rr), np.int64)
    inv[np.concatenate(where) if where else np.zeros(0, np.int64)] = np.arange(len(rr))
    neg_vals = (pa.concat_arrays(parts) if parts else pa.array([], pa.string())).take(pa.array(inv, pa.int64()))
    used = np.zeros((nrow, nt), bool)
    used[rr, tt] = True
    first = np.where(used.any(axis=1), np.argmax(used, axis=1), -1)
    teacher_bits = np.where(mined[:, None], used, grp_present)
    tlabel = _labels(teacher_bits, teachers)

    known = np.zeros(nrow, np.int64)
    full_pos = _combine(batch.column(_FULL_POS)) if _FULL_POS in batch.column_names else None
    if full_pos is not None:
        fl = _lengths(full_pos)
        frows = np.repeat(np.arange(nq), fl)
        fvals = _flat_strings(full_pos)
        hit = _count_listed(src[rr], neg_vals, frows, fvals)
        known = np.bincount(rr[hit], minlength=nrow).astype(np.int64)
        for r in res:  # each teacher's own sample, for its report line
            cr, cc2 = np.nonzero(r.chosen)
            vals = r.cand.take(pa.array(r.starts[cr] + r.win_idx[cr, cc2], pa.int64()))
            h = _count_listed(cr, vals, frows, fvals)
            r.stats["known_fn"] = np.bincount(cr[h], minlength=nq).astype(np.int64)

    # positives of the first contributing teacher (mined rows only)
    pos_take = np.where(mined & (first >= 0), np.maximum(first, 0) * nq + src, -1)
    pos_idx = pa.array(pos_take, pa.int64(), mask=pos_take < 0)

    def from_teachers(attr: str, typ: pa.DataType) -> pa.Array:
        parts = [getattr(r, attr).cast(typ) for r in res]
        return pa.concat_arrays(parts).take(pos_idx) if parts else pa.nulls(nrow, typ)

    src_ix = pa.array(src, pa.int64())
    arrays: dict[str, pa.Array] = {
        C.QUERY_ID: qids.take(src_ix),
        C.QUERY: qtext.take(src_ix).cast(pa.string()),
        C.POSITIVE_IDS: from_teachers("positive_ids", pa.list_(pa.string())),
        C.POSITIVE_SCORES: from_teachers("positive_scores", pa.list_(pa.float32())),
        C.NEGATIVE_IDS: _list_array(cnt, neg_vals, ~mined),
        C.NEGATIVE_SCORES: _list_array(cnt, pa.array(neg_sc, pa.float32()), ~mined),
        C.TEACHER: tlabel,
        C.METHOD: pa.repeat(pa.scalar(label, pa.string()), nrow),
        C.NUM_SHORT: pa.array(n - cnt, pa.int32(), mask=~mined),
        _REASON: _REASONS.take(pa.array(reason, pa.int64(), mask=mined)),
        "_known_fn": pa.array(known, pa.int64()),
        "_delivered": pa.array(cnt, pa.int64()),
    }
    # report columns: a teacher's per-query stats go on the row of that query it belongs to
    for ti, (t, r) in enumerate(zip(teachers, res, strict=True)):
        own = grp_present[:, ti]  # [rows] rows owning teacher t's stats
        q = src[own]
        for s in _STATS:
            col = np.zeros(nrow, np.int64)
            col[own] = r.stats[s][q]
            arrays[_tcol("_" + s, t)] = pa.array(col, pa.int64())
        above = np.full(nrow, -1, np.int64)
        above[own] = r.above[q]
        arrays[_tcol("_above_ceiling", t)] = pa.array(above, pa.int64(), mask=above < 0)  # null: not reported
        for h in _HISTS:
            vals, lens_q = r.hist[h]
            lens_r = np.zeros(nrow, np.int64)
            lens_r[own] = lens_q[q]
            # rows own each query at most once per teacher and keep query order: the flat values stand
            arrays[_tcol("_hist_" + h, t)] = _list_array(lens_r, pa.array(vals, pa.float32()))
    return pa.table(arrays)


def _window_codes(res: list[_Mined], width: int, rows: np.ndarray | None = None,
                  cols: list[np.ndarray] | None = None) -> np.ndarray:
    """Integer codes ``[nq, T, width]`` of each teacher's ordered-list ids (equal id = equal code, -1 pad)."""
    rows = np.arange(res[0].nq) if rows is None else rows
    nr, nt = len(rows), len(res)
    out = np.full((nr, nt, width), -1, np.int64)
    parts, where = [], []
    for ti, r in enumerate(res):
        c = (r.ord_col[rows] if cols is None else cols[ti])[:, :width]  # [nr, <=width]
        i, j = np.nonzero(c >= 0)
        parts.append(r.cand.take(pa.array(r.starts[rows[i]] + c[i, j], pa.int64())))
        where.append((ti, i, j))
    enc = pc.dictionary_encode(pa.concat_arrays(parts)).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    at = 0
    for ti, i, j in where:
        out[i, ti, j] = enc[at: at + len(i)]
        at += len(i)
    return out


def _labels(bits: np.ndarray, teachers: list[str]) -> pa.Array:
    """``"+".join`` of the teachers set in each row of ``bits [rows, T]`` (teacher order)."""
    nrow, nt = bits.shape
    if nt <= 16:
        code = bits.astype(np.int64) @ (1 << np.arange(nt, dtype=np.int64)) if nrow else np.zeros(0, np.int64)
        uniq = np.nonzero(np.bincount(code, minlength=1 << nt))[0]  # combinations present, ascending
        lut = np.zeros(1 << nt, np.int64)
        lut[uniq] = np.arange(len(uniq))
        inv = lut[code]
        names = pa.array(["+".join(t for ti, t in enumerate(teachers) if (c >> ti) & 1) for c in uniq.tolist()],
                         pa.string())
        return names.take(pa.array(inv.astype(np.int64)))
    return pa.array(["+".join(t for t, b in zip(teachers, row, strict=True) if b) for row in bits], pa.string())


# ------------------------------------------------------------------------------------------------
# Analysis helpers
# ------------------------------------------------------------------------------------------------
def hide_positives(positives_table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Analysis mode: hide ``fraction`` of each multi-positive query's positives (seeded, >= 1 stays).

    ``positives_table``: QUERY_ID, DOC_ID (+ optional SCORE; rows with SCORE <= 0 are not positives and
    stay visible). A query with p >= 2 positives hides ``min(p - 1, floor(fraction * p + 0.5))`` of
    them, the ones with the smallest seeded uniform of (seed, query id, doc id): the choice depends
    only on the seed and the ids, not on row order. Returns (visible, hidden) with the input columns.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"hide_positive_fraction must be in [0, 1], got {fraction}")
    t = positives_table
    is_pos = (pc.greater(t[C.SCORE], 0).to_numpy(zero_copy_only=False) if C.SCORE in t.column_names
              else np.ones(t.num_rows, bool))
    qids = pc.cast(t[C.QUERY_ID], pa.string())
    keys = pc.binary_join_element_wise(qids, pc.cast(t[C.DOC_ID], pa.string()), "\x1f")
    u = S.uniforms(S.query_seeds(seed, _combine(keys)), 1, S.STREAM_HIDE)[:, 0]
    qcodes = _combine(pc.dictionary_encode(qids)).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    qcodes = np.where(is_pos, qcodes, -1)
    npos = np.bincount(qcodes[is_pos], minlength=int(qcodes.max(initial=-1)) + 1)
    order = np.lexsort((u, qcodes))  # by query, then uniform
    sq = qcodes[order]
    first = np.searchsorted(sq, sq, side="left")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - first  # rank of each positive within its query
    p = np.where(is_pos, npos[np.maximum(qcodes, 0)], 0)
    n_hide = np.where(p >= 2, np.minimum(p - 1, np.floor(fraction * p + 0.5).astype(np.int64)), 0)
    hide = is_pos & (rank < n_hide)
    return t.filter(pa.array(~hide)), t.filter(pa.array(hide))


def _positives_lists(full_positives: Any) -> pa.Table:
    """QUERY_ID + list of positive doc ids, from a qrels table/URI or a dict qid -> doc ids."""
    if isinstance(full_positives, Mapping):
        qs = list(full_positives)
        return pa.table({C.QUERY_ID: pa.array(qs, pa.string()),
                         _FULL_POS: pa.array([sorted(map(str, full_positives[q])) for q in qs], pa.list_(pa.string()))})
    t = full_positives
    if isinstance(t, str):
        import pyarrow.dataset as pads

        fs, path = storage.resolve(t)
        t = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    if C.SCORE in t.column_names:
        t = t.filter(pc.greater(t[C.SCORE], 0))
    t = pa.table({C.QUERY_ID: pc.cast(t[C.QUERY_ID], pa.string()), C.DOC_ID: pc.cast(t[C.DOC_ID], pa.string())})
    g = t.group_by(C.QUERY_ID).aggregate([(C.DOC_ID, "list")])
    return pa.table({C.QUERY_ID: g[C.QUERY_ID], _FULL_POS: g[f"{C.DOC_ID}_list"]})


# ------------------------------------------------------------------------------------------------
# Ray stage
# ------------------------------------------------------------------------------------------------
def mine_stage(candidates: dict[str, str], queries_uri: str, cfg: MineConfig, out_uri: str,
               ensemble: bool = True, full_positives: Any = None, mined_uri: str | None = None,
               upstream: Any = None, holdout: tuple[int, float] | None = None) -> dict:
    """Mine hard negatives for every query in the teachers' candidate tables; returns the manifest.

    ``full_positives`` (analysis mode): complete qrels (table, Parquet URI or dict qid -> doc ids; a
    Parquet URI holding ``POSITIVE_IDS`` lists — the ingest stage's train queries — is read by Ray Data,
    never collected on the driver); the report then gives the known-false-negative rate of the mined
    negatives. ``upstream``: the keys of the stages whose output this run reads (a new search re-mines).
    ``holdout``: (seed, share) of :func:`raymine.validation.holdout_mask`: those queries are the validation
    split, dropped with the reason ``held_out_for_validation`` (never mined, trained on or exported; the
    per-teacher candidate counts still include them).
    Writes the manifest, report, plot and the ``dropped/`` parts under ``out_uri`` and the mined rows
    under ``mined_uri`` (default ``out_uri/mined``); the parts are written by the mining tasks.
    """
    import ray

    if not candidates:
        raise ValueError("mine_stage: no candidates tables given")
    teachers = list(candidates)
    mined_uri = mined_uri or storage.join(out_uri, "mined")
    dropped_uri = storage.join(out_uri, DROPPED)
    key = storage.stage_key("mine", to_dict(cfg), candidates, queries_uri, ensemble, mined_uri,
                            None if full_positives is None else "full_positives", upstream,
                            *([] if not holdout else [list(holdout)]))
    done = storage.completed(out_uri, key)
    if done is not None and full_positives is None and storage.exists(mined_uri):
        log.info("mine: already done in %s", out_uri)
        return done
    run = storage.StageRun(out_uri, "mine", key, config=to_dict(cfg))
    agg_args = {"num_cpus": 0.25}
    local, nparts = joins.plan([*candidates.values(), queries_uri, *([full_positives] if isinstance(full_positives, str)
                                                                     else [])], cfg.join_partitions)
    ds = None
    for t in teachers:
        # ABOVE_CEILING is optional: candidates written before it existed are still mined
        extra = [C.ABOVE_CEILING] if C.ABOVE_CEILING in parts.schema(candidates[t]).names else []
        d = parts.read_dataset(candidates[t], [C.QUERY_ID, *_IN_COLS, *extra])
        d = d.rename_columns({c: _tcol(c, t) for c in (*_IN_COLS, *extra)})
        ds = d if ds is None else joins.join(ds, d, "full_outer", nparts, (C.QUERY_ID,), local,
                                             aggregator_ray_remote_args=agg_args)
    queries = parts.read_dataset(queries_uri, [C.QUERY_ID, C.TEXT]).rename_columns(
        {C.TEXT: C.QUERY})
    ds = joins.join(ds, queries, "left_outer", nparts, (C.QUERY_ID,), local,
                    aggregator_ray_remote_args=agg_args)
    if full_positives is not None:
        if isinstance(full_positives, str) and C.POSITIVE_IDS in parts.schema(full_positives).names:
            fp = parts.read_dataset(full_positives, [C.QUERY_ID, C.POSITIVE_IDS]).rename_columns(
                {C.POSITIVE_IDS: _FULL_POS})
        else:
            fp = ray.data.from_arrow(_positives_lists(full_positives))
        ds = joins.join(ds, fp, "left_outer", nparts, (C.QUERY_ID,), local,
                        aggregator_ray_remote_args=agg_args)
    for uri in (mined_uri, dropped_uri):  # parts of an unfinished or older run
        storage.delete_dir(uri)
    _delete_file(storage.join(out_uri, LEGACY_DROPPED))
    storage.makedirs(out_uri)
    first = candidates[teachers[0]]  # its query count: the search manifest's, else the footers
    n_queries = parts.manifest_rows(first, storage.join(first, storage.MANIFEST), "queries")
    summaries = ds.map_batches(_mine_and_write, batch_format="pyarrow", batch_size=batch_rows(cfg, n_queries),
                               fn_kwargs={"cfg": cfg, "teachers": teachers, "ensemble": ensemble, "holdout": holdout,
                                          "mined_uri": mined_uri, "dropped_uri": dropped_uri,
                                          "sample_rate": _sample_rate(cfg, n_queries)})
    tot = Totals(cfg, teachers)
    for block in summaries.iter_batches(batch_format="pyarrow", batch_size=None):
        tot.add(block)
    for uri, schema, n in ((mined_uri, MINED_SCHEMA, tot.sums.get("mined_rows", 0)),
                           (dropped_uri, dropped_schema(ensemble), tot.sums.get("dropped_rows", 0))):
        if not n:  # no task wrote a part: an empty table, not a missing one
            _write_named(schema.empty_table(), uri, "part-empty.parquet")
    tot.check_accounting(ensemble)
    _check_keys([mined_uri, dropped_uri], ensemble, tot.sums.get("rows", 0))
    report = tot.report(ensemble, full_positives is not None, out_uri)
    run.counts.update(report["totals"])
    return run.finish(parts=tot.part_records(out_uri, mined_uri, dropped_uri),
                      report=report, teachers=teachers, ensemble=ensemble, candidates=candidates,
                      mined=mined_uri, dropped=dropped_uri)


MINED_SCHEMA = pa.schema([
    (C.QUERY_ID, pa.string()), (C.QUERY, pa.string()), (C.POSITIVE_IDS, pa.list_(pa.string())),
    (C.POSITIVE_SCORES, pa.list_(pa.float32())), (C.NEGATIVE_IDS, pa.list_(pa.string())),
    (C.NEGATIVE_SCORES, pa.list_(pa.float32())), (C.TEACHER, pa.string()), (C.METHOD, pa.string()),
    (C.NUM_SHORT, pa.int32()),
])
DROPPED = "dropped"  # out_uri/dropped/: the dropped rows, parts written by the mining tasks
LEGACY_DROPPED = "dropped.parquet"  # what runs before the dropped/ folder wrote (one file, by the driver)
HELD_OUT = "held_out_for_validation"
DROP_REASONS = (*_REASONS.to_pylist(), HELD_OUT)
_KEY_CHECK_ROWS = 4_000_000  # output rows per key-check task (each reads every part's key columns once)


def dropped_schema(ensemble: bool) -> pa.Schema:
    """Columns of the ``dropped/`` table: QUERY_ID, REASON (+ TEACHER: rows are per teacher without ensembling)."""
    return pa.schema([(C.QUERY_ID, pa.string()), (C.REASON, pa.string())]
                     + ([] if ensemble else [(C.TEACHER, pa.string())]))


def _hold_out(batch: pa.Table, seed: int, share: float) -> pa.Table:
    """Mark the validation queries as dropped (reason ``HELD_OUT``), whatever mining made of them."""
    from raymine.validation import holdout_mask

    if batch.num_rows == 0:
        return batch
    held = pa.array(holdout_mask(batch.column(C.QUERY_ID).to_pylist(), seed, share))
    i = batch.schema.get_field_index(_REASON)
    reason = pc.if_else(held, pa.scalar(HELD_OUT, batch.schema.field(i).type), batch.column(i))
    return batch.set_column(i, batch.schema.field(i), reason)


# ------------------------------------------------------------------------------------------------
# Worker side: write the batch's parts, return its one-row summary
# ------------------------------------------------------------------------------------------------
def _output_keys(out: pa.Table, ensemble: bool) -> pa.Array:
    """The key each output row must hold alone: the query id, or (query id, teacher) without ensembling."""
    if ensemble:
        return _combine(out[C.QUERY_ID])
    return _combine(pc.binary_join_element_wise(out[C.QUERY_ID], out[C.TEACHER], "\x1f"))


def _write_named(table: pa.Table, folder_uri: str, name: str) -> int:
    """Write ``table`` as ``folder_uri/name`` (under a temporary name, then moved: a part that exists is
    complete); returns its size in bytes."""
    fs, path = storage.resolve(storage.join(folder_uri, name))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path + ".tmp", filesystem=fs)
    size = int(fs.get_file_info(path + ".tmp").size)
    fs.move(path + ".tmp", path)
    return size


def _delete_file(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _mine_and_write(batch: pa.Table, cfg: MineConfig, teachers: list[str], ensemble: bool,
                    holdout: tuple[int, float] | None, mined_uri: str, dropped_uri: str,
                    sample_rate: float) -> pa.Table:
    """Mining task: mine one joined batch, write its mined and dropped rows as parts, return its summary.

    Both parts are named by a hash of the batch's output keys in row order, so a retried task (same input
    bundle, same batches) rewrites the same files instead of adding copies."""
    out = mine_batch(batch, cfg, teachers, ensemble)
    if holdout and holdout[1] > 0:
        out = _hold_out(out, *holdout)
    hashes = S.fnv1a64(_output_keys(out, ensemble))  # [rows] uint64
    name = f"part-h{hashlib.blake2b(hashes.tobytes(), digest_size=8).hexdigest()}.parquet"
    is_drop = pc.is_valid(out[_REASON])
    mined, dropped = out.filter(pc.invert(is_drop)), out.filter(is_drop)
    sizes = {"mined_bytes": 0, "dropped_bytes": 0}
    if mined.num_rows:
        sizes["mined_bytes"] = _write_named(mined.select(MINED_SCHEMA.names).cast(MINED_SCHEMA), mined_uri, name)
    if dropped.num_rows:
        cols = {C.QUERY_ID: dropped[C.QUERY_ID], C.REASON: dropped[_REASON]}
        if not ensemble:
            cols[C.TEACHER] = dropped[C.TEACHER]
        sizes["dropped_bytes"] = _write_named(pa.table(cols).cast(dropped_schema(ensemble)), dropped_uri, name)
    return _summary(out, mined, batch.num_rows, hashes, cfg, teachers, sample_rate, name, sizes)


def _summary(out: pa.Table, mined: pa.Table, rows_in: int, hashes: np.ndarray, cfg: MineConfig,
             teachers: list[str], sample_rate: float, name: str, sizes: dict[str, int]) -> pa.Table:
    """One row of counts for the driver: per reason, per teacher and filter; the above-ceiling histogram
    (bucket, count) per teacher; score samples from the rows whose key hash falls under ``sample_rate``."""

    def total(col: Any) -> int:
        return int(pc.sum(col).as_py() or 0)

    reason = out[_REASON]
    row: dict[str, Any] = {
        "part": name, "rows_in": rows_in, "rows": out.num_rows, "mined_rows": mined.num_rows,
        "dropped_rows": out.num_rows - mined.num_rows, **sizes,
        "delivered": total(mined["_delivered"]), "known_fn": total(mined["_known_fn"]),
        "short_queries": total(pc.greater(mined[C.NUM_SHORT], 0)),
        **{f"n:{r}": total(pc.equal(reason, r)) for r in DROP_REASONS},
    }
    lists: dict[str, pa.Array] = {}
    sampled = out if sample_rate >= 1 else out.filter(pa.array((hashes >> np.uint64(11)) * 2.0 ** -53 < sample_rate))
    for t in teachers:
        for s in _STATS:
            row[_tcol(s, t)] = total(out[_tcol("_" + s, t)])
        above = _combine(pc.drop_null(out[_tcol("_above_ceiling", t)])).to_numpy(zero_copy_only=False)
        row[_tcol("above_n", t)], row[_tcol("above_sum", t)] = len(above), int(above.sum())
        b, n = np.unique(above_bucket(above.astype(np.int64)), return_counts=True)
        lists[_tcol("above_bucket", t)] = pa.array([b], pa.list_(pa.int64()))
        lists[_tcol("above_count", t)] = pa.array([n.astype(np.int64)], pa.list_(pa.int64()))
        for h in _HISTS:
            v = _combine(sampled[_tcol("_hist_" + h, t)]).flatten()[: cfg.report_sample]
            lists[_tcol("hist_" + h, t)] = pa.array([v.to_numpy(zero_copy_only=False)], pa.list_(pa.float32()))
    return pa.table({**{k: pa.array([v], pa.string() if k == "part" else pa.int64()) for k, v in row.items()},
                     **lists})


def _sample_rate(cfg: MineConfig, n_queries: int) -> float:
    """Share of rows (by key hash) whose scores the tasks send for the plot: about 2 × ``report_sample``
    rows in all."""
    return min(1.0, 2.0 * cfg.report_sample / max(n_queries, 1))


def batch_rows(cfg: MineConfig, n_queries: int) -> int:
    """Queries per mining task: ``mine.batch_size``, raised so that there are at most
    :func:`raymine.parts.read_tasks` tasks — each task costs the driver ~100 KB for the whole job (measured
    in ``bench/bench_scale.py``), so a fixed batch made the driver grow with the queries. Mining is per
    query (seeds from the query id), so the batch size never changes the mined rows."""
    return parts.bounded_batch(n_queries, cfg.batch_size)


ABOVE_EXACT_BITS = 12  # above-ceiling counts < 2**13 are kept exactly; larger ones within 2**-12 (relative)


def above_bucket(v: np.ndarray) -> np.ndarray:
    """Histogram bucket int64 ``[n]`` of non-negative counts ``v [n]``, increasing with ``v``: ``v`` itself
    below ``2**(B+1)``; above, ``2**B`` equal sub-buckets per power of two (B = ``ABOVE_EXACT_BITS``), so a
    histogram has at most ~``52 * 2**B`` buckets whatever the number of queries."""
    b = ABOVE_EXACT_BITS
    e = np.frexp(np.maximum(v, 1).astype(np.float64))[1].astype(np.int64) - 1  # floor(log2 v), exact below 2**53
    shift = np.maximum(e - b, 0)
    return np.where(v < (1 << (b + 1)), v, (shift << b) + (v >> shift))


def above_value(bucket: np.ndarray) -> np.ndarray:
    """The value a bucket stands for (float64 ``[n]``): itself when exact, else the middle of its range."""
    b = ABOVE_EXACT_BITS
    shift = np.maximum((bucket >> b) - 1, 0)
    sub = bucket - (shift << b)
    lo = (sub << shift).astype(np.float64)
    return np.where(bucket < (1 << (b + 1)), bucket.astype(np.float64), lo + ((1 << shift) - 1) / 2)


# ------------------------------------------------------------------------------------------------
# Driver side: sum the summaries, check the accounting, write the report
# ------------------------------------------------------------------------------------------------
class Totals:
    """What the driver keeps of a mining run: sums, per-teacher above-ceiling histograms (bounded by
    ``above_bucket``'s range), score samples (at most ``report_sample`` each) and one record per part —
    nothing per query. ``received_bytes``: the summaries' Arrow size, summed (what reached the driver)."""

    def __init__(self, cfg: MineConfig, teachers: list[str]):
        self.cfg, self.teachers = cfg, teachers
        self.sums: dict[str, int] = {}
        self.above = {t: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for t in teachers}
        self.samples: dict[str, dict[str, list[np.ndarray]]] = {t: {h: [] for h in _HISTS} for t in teachers}
        self.sampled = {t: dict.fromkeys(_HISTS, 0) for t in teachers}
        self.parts: list[tuple[str, int, int, int, int]] = []  # (name, mined rows, bytes, dropped rows, bytes)
        self.received_bytes = 0

    def add(self, block: pa.Table) -> None:
        """Fold in a block of task summaries."""
        self.received_bytes += block.nbytes
        for name, col in zip(block.column_names, block.columns, strict=True):
            if pa.types.is_integer(col.type):
                self.sums[name] = self.sums.get(name, 0) + int(pc.sum(col).as_py() or 0)
        self.parts.extend(zip(*(block[c].to_pylist() for c in
                                ("part", "mined_rows", "mined_bytes", "dropped_rows", "dropped_bytes")), strict=True))
        for t in self.teachers:
            keys, counts = self.above[t]
            keys = np.concatenate([keys, _flat_ints(block[_tcol("above_bucket", t)])])
            counts = np.concatenate([counts, _flat_ints(block[_tcol("above_count", t)])])
            uniq, inv = np.unique(keys, return_inverse=True)
            self.above[t] = (uniq, np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64))
            for h in _HISTS:
                room = self.cfg.report_sample - self.sampled[t][h]
                if room > 0:
                    v = _combine(block[_tcol("hist_" + h, t)]).flatten()[:room].to_numpy(zero_copy_only=False)
                    self.samples[t][h].append(v)
                    self.sampled[t][h] += len(v)

    def check_accounting(self, ensemble: bool) -> None:
        """Every output row mined or dropped with a known reason, and every joined query in the output (one
        row per query, or per (query, teacher) that has candidates without ensembling) — from counts."""
        s = self.sums
        dropped = sum(s.get(f"n:{r}", 0) for r in DROP_REASONS)
        want = s.get("rows_in", 0) if ensemble else sum(s.get(_tcol("present", t), 0) for t in self.teachers)
        if s.get("mined_rows", 0) + dropped != s.get("rows", 0) or s.get("dropped_rows", 0) != dropped \
                or s.get("rows", 0) != want:
            raise RuntimeError(f"mine: accounting failed: {s.get('rows', 0)} output rows for {want} inputs, "
                               f"{s.get('mined_rows', 0)} mined + {dropped} dropped with a reason")

    def part_records(self, stage_dir: str, mined_uri: str, dropped_uri: str) -> pa.Table:
        """The stage folder's files (one listing) with the row counts the tasks reported for their parts."""
        rows = {}
        for folder, i in ((mined_uri, 1), (dropped_uri, 3)):  # i: the folder's rows in self.parts
            rel = _relative(folder, stage_dir)
            if rel is not None:
                rows.update({f"{rel}/{p[0]}": p[i] for p in self.parts if p[i]})
        files = {n: b for n, b in storage.list_files(stage_dir).items()
                 if not any(x.startswith(("_", ".")) for x in n.replace("\\", "/").split("/"))}
        names = sorted(files)
        return storage.part_table(names, [files[n] for n in names],
                                  [rows.get(n.replace("\\", "/"), 0) if n.endswith(".parquet") else None
                                   for n in names])

    def report(self, ensemble: bool, analysis: bool, out_uri: str) -> dict:
        """The report (as before the tasks wrote the parts): totals, reasons, per-teacher filter counts; plot."""
        cfg, s = self.cfg, self.sums
        totals = {"queries_out": s.get("rows", 0), "mined": s.get("mined_rows", 0),
                  "dropped": s.get("dropped_rows", 0), "requested": s.get("mined_rows", 0) * cfg.num_negatives,
                  "delivered": s.get("delivered", 0), "short_queries": s.get("short_queries", 0),
                  "known_fn": s.get("known_fn", 0)}
        totals["missing"] = totals["requested"] - totals["delivered"]
        totals["shortfall"] = totals["missing"] / totals["requested"] if totals["requested"] else 0.0
        if analysis:
            totals["known_false_negative_rate"] = totals["known_fn"] / totals["delivered"] if totals["delivered"] else 0.0
        per_teacher = {t: self._teacher(t, analysis) for t in self.teachers}
        method = f"{F.method_label(cfg)}/{S.sampling_label(cfg)}"
        report = {"method": method, "ensemble": cfg.ensemble if ensemble and len(self.teachers) > 1 else None,
                  "totals": totals, "per_teacher": per_teacher,
                  "dropped_reasons": {r: s[f"n:{r}"] for r in DROP_REASONS if s.get(f"n:{r}")}}
        samples = {t: {h: np.concatenate(v) if v else np.zeros(0, np.float32) for h, v in self.samples[t].items()}
                   for t in self.teachers}
        try:
            plot_scores(samples, method, storage.join(out_uri, "scores.png"))
            report["plot"] = storage.join(out_uri, "scores.png")
        except Exception as e:  # a plot must not lose the mined data; say why it is missing
            log.warning("mine: score plot not written: %s", e)
            report["plot_error"] = str(e)
        storage.write_json(storage.join(out_uri, "report.json"), report)
        in_search = {t: per_teacher[t]["above_ceiling"] for t in self.teachers}
        log.info("mine %s: %s; removed by the ceiling inside the search (positives included): %s", method,
                 json.dumps(totals), json.dumps(in_search))
        return report

    def _teacher(self, t: str, analysis: bool) -> dict:
        s = {k: self.sums.get(_tcol(k, t), 0) for k in _STATS}
        s["short"] = s["requested"] - s["delivered"]
        s["shortfall"] = s["short"] / s["requested"] if s["requested"] else 0.0
        if analysis:
            s["known_false_negative_rate"] = s["known_fn"] / s["delivered"] if s["delivered"] else 0.0
        n = self.sums.get(_tcol("above_n", t), 0)
        s["above_ceiling_queries"] = n  # 0: candidates table without ABOVE_CEILING
        s["above_ceiling"] = self.sums.get(_tcol("above_sum", t), 0) if n else None
        s["above_ceiling_median"] = _median(*self.above[t]) if n else None
        return s


def _flat_ints(col: pa.ChunkedArray) -> np.ndarray:
    return _combine(col).flatten().to_numpy(zero_copy_only=False).astype(np.int64)


def _median(buckets: np.ndarray, counts: np.ndarray) -> float:
    """The median (``np.median``'s: the mean of the two middle values) of a histogram from ``above_bucket``;
    exact when both middle values are below ``2**(ABOVE_EXACT_BITS + 1)``."""
    order = np.argsort(buckets)
    cum = np.cumsum(counts[order])
    n = int(cum[-1])
    mid = np.searchsorted(cum, [(n - 1) // 2, n // 2], side="right")  # bucket of each middle rank
    return float(above_value(buckets[order][mid]).mean())


def _relative(folder: str, root: str) -> str | None:
    """``folder`` relative to ``root`` (posix separators) when it lies under it, else None."""
    f, r = folder.replace("\\", "/").rstrip("/"), root.replace("\\", "/").rstrip("/")
    return f[len(r) + 1:] if f.startswith(r + "/") else None


def _check_keys(folders: list[str], ensemble: bool, rows: int) -> None:
    """Ray tasks read the key columns of every written part and count repeats (each task the keys whose hash
    falls in its bucket); the driver gets counts only. Repeated keys, or fewer rows on disk than the tasks
    counted (two batches with the same keys write the same part name), mean a duplicated input query id."""
    import ray

    files = [f for uri in folders for f in parts.list_parquet(uri)]
    n_tasks = max(1, -(-rows // _KEY_CHECK_ROWS))
    task = ray.remote(num_cpus=0.25)(_count_keys)
    got = ray.get([task.remote(folders[0], files, ensemble, b, n_tasks) for b in range(n_tasks)])
    on_disk, repeated = (sum(x) for x in zip(*got, strict=True))
    if repeated or on_disk < rows:
        raise ValueError("mine: duplicated query ids in a candidates table (output keys repeat); "
                         "each teacher's table must hold one row per query")
    if on_disk != rows:
        raise RuntimeError(f"mine: the output parts hold {on_disk} rows where the tasks wrote {rows}")


def _count_keys(uri: str, files: list[str], ensemble: bool, bucket: int, n_buckets: int) -> tuple[int, int]:
    """``_check_keys``' task: (rows, repeated keys) among the keys of ``files`` whose hash is in ``bucket``."""
    fs, _ = storage.resolve(uri)
    hashes = []
    for f in files:
        t = pq.read_table(f, columns=[C.QUERY_ID] if ensemble else [C.QUERY_ID, C.TEACHER], filesystem=fs)
        h = S.fnv1a64(_output_keys(t, ensemble)) if t.num_rows else np.zeros(0, np.uint64)
        hashes.append(h[h % np.uint64(n_buckets) == bucket])
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    return len(h), len(h) - len(np.unique(h))


def plot_scores(samples: dict[str, dict[str, np.ndarray]], title: str, out_uri: str) -> None:
    """Histograms of positive vs kept (mined) vs method-dropped negative scores, one panel per teacher."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(5 * len(samples), 3.5), squeeze=False)
    for ax, (t, s) in zip(axes[0], samples.items(), strict=False):
        allv = np.concatenate([v for v in s.values() if len(v)] or [np.zeros(1)])
        bins = np.linspace(float(allv.min()), float(allv.max()) + 1e-6, 50)
        for h, color in (("positive", "tab:green"), ("kept", "tab:blue"), ("dropped", "tab:red")):
            if len(s[h]):
                ax.hist(s[h], bins=bins, alpha=0.5, density=True, color=color, label=f"{h} ({len(s[h])})")
        ax.set_title(f"{t}: {title}", fontsize=9)
        ax.set_xlabel("teacher score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(out_uri, buf.getvalue())
