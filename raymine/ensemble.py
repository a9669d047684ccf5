"""Teacher ensembling of mined negatives (NV-Retriever, arXiv 2407.15831, section on ensembling).

Teachers disagree (Jaccard of their top-4 < 0.30 in the paper), so their negatives can be combined.
Each function works on *one query*: ``lists[t]`` is teacher t's ordered negatives for it (its sampled
negatives first, then its other kept candidates in rank order as replacements), or ``None`` when
that teacher has no row for the query. The result is a list of picks ``(teacher, position)``.

- ``cross_sample``: one teacher drawn per query (uniform over teachers with at least one negative,
  using the query's seeded uniform ``u``); its first n negatives.
- ``intra_sample_dedup``: round-robin over teachers (in the given order) taking each teacher's next
  negative; one already taken is skipped for that teacher's next unique negative.
- ``intra_sample_no_dedup``: the same round-robin; duplicates are kept (the paper's best).

A teacher that runs out is skipped and the others fill in. A single teacher is the identity.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

Pick = tuple[int, int]  # (teacher index, position in that teacher's list)
ENSEMBLE_METHODS = ("cross_sample", "intra_sample_dedup", "intra_sample_no_dedup")


def _present(lists: Sequence[Sequence[Any] | None]) -> list[int]:
    return [t for t, lst in enumerate(lists) if lst is not None]


def cross_sample(lists: Sequence[Sequence[Any] | None], n: int, u: float) -> list[Pick]:
    """One teacher per query, drawn with the uniform ``u`` in [0, 1) among teachers with negatives."""
    cands = [t for t in _present(lists) if len(lists[t])]  # type: ignore[arg-type]
    if not cands:
        return []
    t = cands[min(int(u * len(cands)), len(cands) - 1)]
    return [(t, j) for j in range(min(n, len(lists[t])))]  # type: ignore[arg-type]


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
