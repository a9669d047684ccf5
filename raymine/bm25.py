"""BM25 as a sparse teacher, built on bm25s (no hand-written scoring).

Gives what the dense teachers give the mining stage: per-query candidates (doc ids, scores,
best first) optionally below a per-query score ceiling, and the score of any listed doc (positives).
The ceiling search is exact: it masks the full score vector of each query before the top-k.
Only documents that share at least one term with the query (score > 0) are candidates: lucene
BM25 scores are never negative, a zero means no term overlap, and bm25s orders those arbitrarily.
Ties are broken by corpus row (lower first), so results are deterministic.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from raymine.config import TeacherConfig

log = logging.getLogger(__name__)


def top_k_rows(scores: np.ndarray, k: int, ceiling: float = np.inf) -> np.ndarray:
    """Rows of the ``k`` best scores with 0 < score < ceiling, best first, ties by lower row. scores [n]."""
    valid = scores > 0
    if np.isfinite(ceiling) or np.isnan(ceiling):
        if np.isnan(ceiling):
            raise ValueError("ceiling is NaN; use +inf for 'no ceiling'")
        valid &= scores < ceiling
    cand = np.flatnonzero(valid)  # [m]
    if k <= 0 or cand.size == 0:
        return cand[:0]
    if cand.size > k:  # keep everything tied with the k-th best, then order exactly
        kth = np.partition(scores[cand], cand.size - k)[cand.size - k]
        cand = cand[scores[cand] >= kth]
    order = np.lexsort((cand, -scores[cand]))[:k]  # primary: score desc; secondary: row asc
    return cand[order]


class BM25Teacher:
    """A bm25s index over a corpus: ``index`` once, then ``search`` / ``score`` query batches."""

    def __init__(self, cfg: TeacherConfig) -> None:
        if cfg.kind != "bm25":
            raise ValueError(f"BM25Teacher needs a teacher of kind 'bm25', got {cfg.kind!r}")
        self.cfg = cfg
        self._retriever = None
        self.doc_ids = np.zeros(0, dtype=object)
        self._row: dict[str, int] = {}

    # -- tokenisation ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """bm25s's tokeniser (lowercase, \\w\\w+ tokens, stopwords from config)."""
        import bm25s

        stop = self.cfg.bm25_stopwords or None
        return bm25s.tokenize(list(texts), stopwords=stop, return_ids=False, show_progress=False)

    # -- index ----------------------------------------------------------------------------------
    def index(self, doc_ids: Sequence[str], texts: Sequence[str]) -> None:
        """Build the index. Ids must be unique strings; texts non-empty (ingest drops empty ones)."""
        import bm25s

        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(texts)} texts")
        if len(doc_ids) == 0:
            raise ValueError("cannot index an empty corpus")
        ids = np.asarray([str(d) for d in doc_ids], dtype=object)
        row = {d: i for i, d in enumerate(ids)}
        if len(row) != len(ids):
            seen: set[str] = set()
            dup = next(d for d in ids if d in seen or seen.add(d))
            raise ValueError(f"duplicate doc id {dup!r} in the BM25 corpus")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"document {ids[i]!r} (row {i}) has an empty text; ingest should have dropped it")
        tokens = self.tokenize(texts)
        retriever = bm25s.BM25(k1=self.cfg.bm25_k1, b=self.cfg.bm25_b, method=self.cfg.bm25_method)
        retriever.index(tokens, show_progress=False)
        self._retriever = retriever
        self.doc_ids = ids
        self._row = row
        n_empty = sum(1 for t in tokens if not t)
        log.info("BM25 index: %d docs, %d terms, %d docs with no token after stopwords",
                 len(ids), len(retriever.vocab_dict), n_empty)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def _require_index(self):
        if self._retriever is None:
            raise RuntimeError("BM25Teacher.index(...) must be called before search/score")
        return self._retriever

    def full_scores(self, query_tokens: list[str]) -> np.ndarray:
        """BM25 score of every corpus row for one tokenised query → float32 [num_docs]."""
        r = self._require_index()
        ids = r.get_tokens_ids(query_tokens)
        if not ids:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(r.get_scores_from_ids(ids), dtype=np.float32)

    # -- queries --------------------------------------------------------------------------------
    def search(
        self, query_texts: Sequence[str], k: int, ceilings: np.ndarray | None = None,
        return_above: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` docs per query (only score < ceiling[i] when given; +inf = no ceiling).

        Returns doc ids object [nq, k] ("" where fewer than k docs qualify) and scores float32 [nq, k]
        (-inf there), best first; with ``return_above`` also ``above [nq] int64``: corpus docs scoring
        ``>= ceiling[i]`` (what the ceiling removed, positives included; 0 without a ceiling).
        """
        nq = len(query_texts)
        if ceilings is not None:
            ceilings = np.asarray(ceilings, dtype=np.float64).reshape(-1)
            if ceilings.shape[0] != nq:
                raise ValueError(f"{ceilings.shape[0]} ceilings for {nq} queries")
        out_ids = np.full((nq, k), "", dtype=object)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        above = np.zeros(nq, dtype=np.int64)
        for i, toks in enumerate(self.tokenize(query_texts)):
            s = self.full_scores(toks)  # [num_docs]
            c = np.inf if ceilings is None else float(ceilings[i])
            rows = top_k_rows(s, k, c)
            out_ids[i, : rows.size] = self.doc_ids[rows]
            out_scores[i, : rows.size] = s[rows]
            if return_above and not np.isposinf(c):
                above[i] = int((s >= c).sum())  # NaN ceilings were rejected by top_k_rows
        return (out_ids, out_scores, above) if return_above else (out_ids, out_scores)

    def score(self, query_texts: Sequence[str], doc_ids: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """BM25 score of each listed doc for each query → one float32 array per query (e.g. positives)."""
        if len(query_texts) != len(doc_ids):
            raise ValueError(f"{len(query_texts)} queries but {len(doc_ids)} doc-id lists")
        out = []
        for i, toks in enumerate(self.tokenize(query_texts)):
            try:
                rows = np.asarray([self._row[str(d)] for d in doc_ids[i]], dtype=np.int64)
            except KeyError as e:
                raise KeyError(f"query {i}: doc id {e.args[0]!r} is not in the BM25 index") from None
            out.append(self.full_scores(toks)[rows] if rows.size else np.zeros(0, dtype=np.float32))
        return out
