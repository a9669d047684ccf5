"""Teacher ensembling of mined negatives (NV-Retriever, arXiv 2407.15831, section on ensembling).

Teachers disagree (Jaccard of their top-4 < 0.30 in the paper), so their negatives can be combined.
Each function works on *one query*: ``lists[t]`` is teacher t's ordered negatives for it (its sampled
negatives first, then its other kept candidates in rank order as replacements), or ``None`` when
that teacher has no row for the query. The result is a list of picks ``(teacher, position)``.

- ``cross_sample``: one teacher drawn per query (uniform over teachers with at least one negative,
  using the query's seeded uniform ``u``); its first n negatives. When it has fewer than n, the other
  teachers fill in, in cyclic teacher order after the drawn one (t+1, t+2, ..., wrapping), each in its
  own order, skipping ids already taken.
- ``intra_sample_dedup``: round-robin over teachers (in the given order) taking each teacher's next
  negative; one already taken is skipped for that teacher's next unique negative.
- ``intra_sample_no_dedup``: the same round-robin; duplicates are kept (the paper's best).

A teacher that runs out is skipped and the others fill in. A single teacher is the identity.

The list functions are the reference semantics. :func:`ensemble_arrays` computes the same picks for a
whole batch at once on padded ``[nq, T, L]`` arrays (the mining stage's path); tests compare the two.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Pick = tuple[int, int]  # (teacher index, position in that teacher's list)
ENSEMBLE_METHODS = ("cross_sample", "intra_sample_dedup", "intra_sample_no_dedup")


def _present(lists: Sequence[Sequence[Any] | None]) -> list[int]:
    return [t for t, lst in enumerate(lists) if lst is not None]


def cross_sample(lists: Sequence[Sequence[Any] | None], n: int, u: float) -> list[Pick]:
    """One teacher per query, drawn with the uniform ``u`` in [0, 1) among teachers with negatives.

    Its first n; if it has fewer, the other teachers fill in (cyclic order after it, skipping taken ids).
    """
    cands = [t for t in _present(lists) if len(lists[t])]  # type: ignore[arg-type]
    if not cands:
        return []
    t0 = cands[min(int(u * len(cands)), len(cands) - 1)]
    picks: list[Pick] = [(t0, j) for j in range(min(n, len(lists[t0])))]  # type: ignore[arg-type]
    seen = {lists[t0][j] for _, j in picks}  # type: ignore[index]
    nt = len(lists)
    for step in range(1, nt):
        t = (t0 + step) % nt
        lst = lists[t]
        if lst is None:
            continue
        for j, d in enumerate(lst):
            if len(picks) >= n:
                return picks
            if d not in seen:
                picks.append((t, j))
                seen.add(d)
    return picks


def intra_sample(lists: Sequence[Sequence[Any] | None], n: int, dedup: bool) -> list[Pick]:
    """Round-robin over teachers: first of each, then second of each...; ``dedup`` skips taken ids."""
    present = _present(lists)
    picks: list[Pick] = []
    seen: set[Any] = set()
    pos = {t: 0 for t in present}
    while len(picks) < n:
        progressed = False
        for t in present:
            if len(picks) >= n:
                break
            lst = lists[t]
            assert lst is not None
            if dedup:
                while pos[t] < len(lst) and lst[pos[t]] in seen:
                    pos[t] += 1
            if pos[t] < len(lst):
                picks.append((t, pos[t]))
                seen.add(lst[pos[t]])
                pos[t] += 1
                progressed = True
        if not progressed:
            break
    return picks


def intra_sample_dedup(lists: Sequence[Sequence[Any] | None], n: int) -> list[Pick]:
    """Round-robin; a duplicate is replaced by that teacher's next unique negative."""
    return intra_sample(lists, n, dedup=True)


def intra_sample_no_dedup(lists: Sequence[Sequence[Any] | None], n: int) -> list[Pick]:
    """Round-robin; duplicates kept."""
    return intra_sample(lists, n, dedup=False)


def ensemble(method: str, lists: Sequence[Sequence[Any] | None], n: int, u: float) -> list[Pick]:
    """Dispatch by name; with one teacher present every method is the identity (its first n)."""
    present = _present(lists)
    if len(present) == 1:
        t = present[0]
        return [(t, j) for j in range(min(n, len(lists[t])))]  # type: ignore[arg-type]
    if method == "cross_sample":
        return cross_sample(lists, n, u)
    if method == "intra_sample_dedup":
        return intra_sample_dedup(lists, n)
    if method == "intra_sample_no_dedup":
        return intra_sample_no_dedup(lists, n)
    raise ValueError(f"mine.ensemble: {method!r} is not one of {list(ENSEMBLE_METHODS)}")


# ------------------------------------------------------------------------------------------------
# Batch form: the same picks for nq queries at once
# ------------------------------------------------------------------------------------------------
def ensemble_arrays(method: str, lens: np.ndarray, n: int, u: np.ndarray, codes: np.ndarray | None = None,
                    present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`ensemble` for a batch. ``lens [nq, T]``: each teacher's list length (0 = no list / no row);
    ``codes [nq, T, L]``: the first L ids of each list as integer codes (equal id = equal code; needed
    by ``intra_sample_dedup`` and by ``cross_sample``'s fill, not by ``intra_sample_no_dedup``); ``u [nq]``;
    ``present [nq, T]``: which teachers have a list at all, empty or not (the ``None`` of :func:`ensemble`;
    default ``lens > 0``) — one present list is the identity.

    Returns ``(teacher [nq, n], position [nq, n], count [nq], redo [nq])``: picks padded with -1, and the
    rows whose picks could depend on list entries past L (call again for those rows with a larger L).
    With lists of unique ids, L >= 2n never needs a redo.
    """
    lens = np.asarray(lens, dtype=np.int64)
    nq, nt = lens.shape
    pt = np.full((nq, max(n, 0)), -1, dtype=np.int64)
    pp = np.full((nq, max(n, 0)), -1, dtype=np.int64)
    count = np.zeros(nq, dtype=np.int64)
    redo = np.zeros(nq, dtype=bool)
    if n <= 0 or nq == 0 or nt == 0:
        return pt, pp, count, redo
    has = lens > 0
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"mine.ensemble: {method!r} is not one of {list(ENSEMBLE_METHODS)}")
    # round-robin slots (round r, teacher t), round-major; also the identity of a single teacher
    r_of = np.repeat(np.arange(n), nt)  # [n*T]
    t_of = np.tile(np.arange(nt), n)  # [n*T]
    ok = r_of[None, :] < lens[:, t_of]  # [nq, n*T]
    rank = np.cumsum(ok, axis=1) - 1
    take = ok & (rank < n)
    r, c = np.nonzero(take)
    pt[r, rank[r, c]] = t_of[c]
    pp[r, rank[r, c]] = r_of[c]
    count[:] = np.count_nonzero(take, axis=1)
    if method == "intra_sample_no_dedup" or nt == 1:
        return pt, pp, count, redo
    if codes is None:
        raise ValueError(f"ensemble_arrays: {method} needs the ids' codes")
    present = has if present is None else np.asarray(present, dtype=bool)
    multi = np.count_nonzero(present, axis=1) >= 2  # one present list: the identity above
    rows = np.nonzero(multi)[0]
    if not len(rows):
        return pt, pp, count, redo
    sub = _dedup(lens[rows], codes[rows], n) if method == "intra_sample_dedup" else \
        _cross(lens[rows], codes[rows], n, np.asarray(u, dtype=np.float64)[rows])
    pt[rows], pp[rows], count[rows], redo[rows] = sub
    return pt, pp, count, redo


def _dedup(lens: np.ndarray, codes: np.ndarray, n: int):
    """Round-robin with duplicates replaced by the teacher's next unique id, vectorised over rows."""
    nq, nt, width = codes.shape
    pt = np.full((nq, n), -1, dtype=np.int64)
    pp = np.full((nq, n), -1, dtype=np.int64)
    picked = np.full((nq, n), -2, dtype=np.int64)  # codes taken so far (-2: none; -1 pads codes)
    cnt = np.zeros(nq, dtype=np.int64)
    ptr = np.zeros((nq, nt), dtype=np.int64)
    redo = np.zeros(nq, dtype=bool)
    avail = np.minimum(lens, width)  # [nq, T] entries we can see
    ar = np.arange(nq)
    for _ in range(n):  # each productive round adds >= 1 pick
        progressed = np.zeros(nq, dtype=bool)
        for t in range(nt):
            need = cnt < n
            while True:  # skip this teacher's ids already taken
                at = ptr[:, t]
                inside = need & (at < avail[:, t])
                code = codes[ar, t, np.minimum(at, width - 1)]
                dup = inside & (picked == code[:, None]).any(axis=1)
                if not dup.any():
                    break
                ptr[dup, t] += 1
            at = ptr[:, t]
            redo |= need & (at >= width) & (lens[:, t] > width)  # ran past what we can see
            can = need & (at < avail[:, t])
            i = np.nonzero(can)[0]
            pt[i, cnt[i]] = t
            pp[i, cnt[i]] = at[i]
            picked[i, cnt[i]] = codes[i, t, at[i]]
            cnt[i] += 1
            ptr[i, t] += 1
            progressed |= can
        if not progressed.any():
            break
    return pt, pp, cnt, redo


def _cross(lens: np.ndarray, codes: np.ndarray, n: int, u: np.ndarray):
    """One teacher drawn per row with ``u``; a short list filled by the others (cyclic, unseen ids)."""
    nq, nt, width = codes.shape
    has = lens > 0
    m = np.count_nonzero(has, axis=1)  # [nq] teachers with entries (>= 2 here)
    j = np.minimum((u * m).astype(np.int64), m - 1)  # index among them
    t0 = np.argmax(np.cumsum(has, axis=1) == (j + 1)[:, None], axis=1)  # [nq] drawn teacher
    # the sequence: drawn teacher's list, then the others in cyclic order; [nq, T*width]
    order = (t0[:, None] + np.arange(nt)[None, :]) % nt  # [nq, T]
    ar = np.arange(nq)[:, None]
    seq_codes = codes[ar, order].reshape(nq, nt * width)
    seq_t = np.repeat(order, width, axis=1)  # [nq, T*width]
    seq_p = np.tile(np.arange(width), nt)[None, :].repeat(nq, axis=0)
    ok = seq_p < np.minimum(lens[ar, seq_t], width)  # [nq, T*width]
    first = seq_t == t0[:, None]
    # a fill entry is skipped when an earlier entry of the sequence has its id (all earlier entries
    # are either taken or skipped copies of taken ones, until n are taken)
    eq = (seq_codes[:, :, None] == seq_codes[:, None, :]) & ok[:, :, None] & ok[:, None, :]  # [nq, M, M]
    earlier = np.tril(np.ones((nt * width, nt * width), dtype=bool), -1)  # [i, j]: j < i
    dup = (eq & earlier[None]).any(axis=2) & ~first
    use = ok & ~dup
    rank = np.cumsum(use, axis=1) - 1
    take = use & (rank < n)
    pt = np.full((nq, n), -1, dtype=np.int64)
    pp = np.full((nq, n), -1, dtype=np.int64)
    r, c = np.nonzero(take)
    pt[r, rank[r, c]] = seq_t[r, c]
    pp[r, rank[r, c]] = seq_p[r, c]
    cnt = np.count_nonzero(take, axis=1)
    # a truncated list (longer than width) used up before n were taken: entries past it might count
    seg_taken = np.cumsum(take.reshape(nq, nt, width).sum(axis=2), axis=1)  # [nq, T] taken after segment
    truncated = lens[ar, order] > width
    if width < n:  # the drawn teacher itself is cut short
        truncated[:, 0] |= lens[np.arange(nq), t0] > width
    redo = (truncated & (seg_taken < n)).any(axis=1)
    return pt, pp, cnt, redo
