"""Search stage: every training query's candidates from one teacher, with the mining method's per-query
score ceiling applied inside the search (``raymine.index`` for the sharded FAISS index, ``raymine.bm25``
for the sparse teacher). Output: one row per query (``SEARCH_SCHEMA``), Parquet parts + manifest.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import storage
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
from raymine.config import SearchConfig, TeacherConfig, to_dict
from raymine.index import ShardedIndex, _embeddings, embedding_layout, list_parquet, recall_at_k

log = logging.getLogger(__name__)

STAGE = "search"
PART = "part-{:05d}.parquet"

SEARCH_SCHEMA = pa.schema(
    [
        (QUERY_ID, pa.string()),
        (POSITIVE_IDS, pa.list_(pa.string())),
        (POSITIVE_SCORES, pa.list_(pa.float32())),
        (EXCLUDED_IDS, pa.list_(pa.string())),
        (CANDIDATE_IDS, pa.list_(pa.string())),
        (CANDIDATE_SCORES, pa.list_(pa.float32())),
        (CEILING, pa.float32()),
        (TEACHER, pa.string()),
        (ABOVE_CEILING, pa.int64()),
    ]
)


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
def _iter_query_embeddings(uri: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(query ids, embeddings float32 [b, d]) batches streamed from the query embedding Parquet."""
    fs, _ = storage.resolve(uri)
    dim, _ = embedding_layout(uri, QUERY_ID)
    for path in list_parquet(uri):
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=[QUERY_ID, EMBEDDING]):
                yield rb.column(QUERY_ID).to_pylist(), _embeddings(rb.column(EMBEDDING), dim)


class _Positives:
    """query id → (positive ids, excluded ids) from the positives table (ids only, no vectors)."""

    def __init__(self, table: pa.Table) -> None:
        for col in (QUERY_ID, POSITIVE_IDS):
            if col not in table.column_names:
                raise ValueError(f"positives table lacks column {col!r} (has {table.column_names})")
        qids = table.column(QUERY_ID).to_pylist()
        self.row = {q: i for i, q in enumerate(qids)}
        if len(self.row) != len(qids):
            raise ValueError(f"positives table has {len(qids) - len(self.row)} duplicate query ids")
        self.pos = table.column(POSITIVE_IDS).to_pylist()
        self.exc = (table.column(EXCLUDED_IDS).to_pylist() if EXCLUDED_IDS in table.column_names
                    else [[] for _ in qids])
        self.exc = [e or [] for e in self.exc]
        self.pos = [p or [] for p in self.pos]


def _search_batches(
    batches: Iterator[tuple[list[str], Any]],
    positives: _Positives,
    score_fn: Callable[[Any, list[list[str]]], list[np.ndarray]],
    search_fn: Callable[[Any, int, np.ndarray | None], tuple[np.ndarray, np.ndarray, np.ndarray]],
    depth_fn: Callable[[int], int],
    ceiling_fn: Callable[[list[np.ndarray]], np.ndarray] | None,
    cfg: SearchConfig,
    out_uri: str,
    teacher: str,
    counts: dict[str, Any],
) -> list[int]:
    """Shared per-batch loop of the dense and BM25 stages; writes one part file per batch.

    ``search_fn(payload, k, ceilings)`` → (scores [nq,k], doc ids [nq,k], above [nq]): ``above`` =
    corpus docs scoring ``>= ceiling`` (positives included), written as ``ABOVE_CEILING``."""
    depths_all: list[int] = []
    seen: set[str] = set()
    part = 0
    for qids, payload in batches:
        sel = [j for j, q in enumerate(qids) if q in positives.row and q not in seen]
        dup = sum(1 for q in qids if q in seen)
        counts["duplicate_query_embeddings"] += dup
        counts["queries_without_positives"] += len(qids) - len(sel) - dup
        if not sel:
            continue
        qids = [qids[j] for j in sel]
        payload = payload[sel] if isinstance(payload, np.ndarray) else [payload[j] for j in sel]
        seen.update(qids)
        rows = [positives.row[q] for q in qids]
        pos = [positives.pos[r] for r in rows]
        exc = [positives.exc[r] for r in rows]
        pos_scores = score_fn(payload, pos)
        missing = np.fromiter((int(np.isnan(s).sum()) for s in pos_scores), np.int64, len(qids))
        counts["positives_not_found"] += int(missing.sum())
        counts["queries_with_positive_not_found"] += int((missing > 0).sum())
        if ceiling_fn is not None:
            ceil = np.asarray(ceiling_fn([s[~np.isnan(s)] for s in pos_scores]), np.float32).reshape(-1)
            if ceil.shape[0] != len(qids):
                raise ValueError(f"ceiling_fn returned {ceil.shape[0]} ceilings for {len(qids)} queries")
        else:
            ceil = np.full(len(qids), np.inf, np.float32)
        counts["ceiling_nan"] += int(np.isnan(ceil).sum())
        depths = [int(depth_fn(len(p) + len(e))) for p, e in zip(pos, exc, strict=True)]
        if cfg.depth > 0:
            depths = [cfg.depth] * len(qids)
        k = max(depths)
        use = cfg.use_ceiling and ceiling_fn is not None
        scores, ids, above = search_fn(payload, k, np.where(np.isnan(ceil), np.inf, ceil) if use else None)
        above = np.zeros(len(qids), np.int64) if not use else np.asarray(above, np.int64).reshape(-1)
        counts["above_ceiling"] += int(above.sum())
        cand_ids, cand_scores = [], []
        for j, d in enumerate(depths):
            keep = ids[j, :d] != ""
            cand_ids.append(ids[j, :d][keep])
            cand_scores.append(scores[j, :d][keep])
            counts["queries_short"] += int(keep.sum() < d)
        counts["candidates"] += int(sum(len(c) for c in cand_ids))
        table = pa.table(
            {
                QUERY_ID: pa.array(qids, pa.string()),
                POSITIVE_IDS: pa.array(pos, pa.list_(pa.string())),
                POSITIVE_SCORES: _list_array([np.asarray(s, np.float32) for s in pos_scores], pa.float32()),
                EXCLUDED_IDS: pa.array(exc, pa.list_(pa.string())),
                CANDIDATE_IDS: _list_array(cand_ids, pa.string()),
                CANDIDATE_SCORES: _list_array(cand_scores, pa.float32()),
                CEILING: pa.array(ceil, pa.float32()),
                TEACHER: pa.array([teacher] * len(qids), pa.string()),
                ABOVE_CEILING: pa.array(above, pa.int64()),
            },
            schema=SEARCH_SCHEMA,
        )
        storage.makedirs(out_uri)
        fs, path = storage.resolve(storage.join(out_uri, PART.format(part)))
        pq.write_table(table, path, filesystem=fs)
        part += 1
        counts["queries"] += len(qids)
        depths_all.extend(depths)
    counts["queries_without_embedding"] = len(positives.row) - len(seen)
    counts["parts"] = part
    return depths_all


def _list_array(values: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """Variable-length lists from per-row numpy arrays without per-element Python objects."""
    lens = np.fromiter((len(v) for v in values), np.int32, len(values))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)  # [n + 1]
    flat = np.concatenate(values) if values else np.empty(0)
    if pa.types.is_string(value_type):
        flat_arr = pa.array(flat.astype(object) if flat.size else [], pa.string())
    else:
        flat_arr = pa.array(flat.astype(np.float32) if flat.size else np.empty(0, np.float32), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat_arr)


def _new_counts() -> dict[str, Any]:
    return {k: 0 for k in ("queries", "queries_without_positives", "positives_not_found",
                           "queries_with_positive_not_found", "ceiling_nan", "duplicate_query_embeddings", "queries_short", "candidates",
                           "short_below_ceiling_at_max_depth", "above_ceiling")}


def _depth_summary(depths: list[int]) -> dict[str, Any]:
    if not depths:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(min(depths)), "max": int(max(depths)), "mean": round(float(np.mean(depths)), 2)}


def search_stage(
    query_emb_uri: str,
    positives: pa.Table,
    index: ShardedIndex,
    depth_fn: Callable[[int], int],
    ceiling_fn: Callable[[list[np.ndarray]], np.ndarray] | None,
    cfg: SearchConfig,
    out_uri: str,
    teacher: str,
    key_extra: Any = None,
) -> dict[str, Any]:
    """Candidates of every query for one dense teacher → Parquet under ``out_uri`` + manifest.

    Per batch of ``cfg.query_batch_size`` query embeddings: exact positive scores
    (``index.lookup_scores``), ceilings = ``ceiling_fn(positive scores without the missing ones)``,
    candidates = ``index.search(k = max depth of the batch, ceilings)``, each row cut to
    ``depth_fn(#positives + #excluded)``. Positives and excluded ids stay in the candidates (mining
    removes and counts them). ``ceiling_fn`` gets each query's positive scores with the positives
    missing from the corpus (NaN, counted) left out; a NaN ceiling is written as NaN (the mine stage
    drops such queries) and that query is searched without a ceiling. ``ABOVE_CEILING``: corpus docs
    scoring ``>= ceiling`` (the ceiling's removals, positives included; exact for ``Flat``, a lower
    bound for IVF/PQ; 0 without a ceiling), summed in ``counts["above_ceiling"]``. ``key_extra``: whatever else decides the output (mining config, upstream
    stage keys), since the callables cannot be hashed. Skipped when a manifest with the same key exists.
    """
    key = storage.stage_key(STAGE, teacher, to_dict(cfg), query_emb_uri, index.uri, index.num_docs,
                            index.cfg.index_factory, key_extra)
    done, run = storage.begin(out_uri, f"{STAGE}:{teacher}", key, config=to_dict(cfg))
    if run is None:
        return done
    run.counts = _new_counts()
    shorts = []
    sample: list[np.ndarray] = []

    def search_fn(q: np.ndarray, k: int, ceil: np.ndarray | None):
        if not index.exact and len(sample) * cfg.query_batch_size < cfg.recall_sample:
            sample.append(q[: cfg.recall_sample])
        s, ids = index.search(q, k, ceil)
        shorts.append(index.last_stats.get("short", 0))
        return s, ids, index.last_above_ceiling

    depths = _search_batches(
        _iter_query_embeddings(query_emb_uri, cfg.query_batch_size), _Positives(positives),
        index.lookup_scores, search_fn, depth_fn, ceiling_fn, cfg, out_uri, teacher, run.counts,
    )
    run.counts["short_below_ceiling_at_max_depth"] = int(sum(shorts))
    recall = None
    if not index.exact and sample and depths:
        q = np.concatenate(sample)[: cfg.recall_sample]  # [n_sample, d]
        recall = {}
        for k in sorted({10, min(max(depths), index.num_docs)}):
            approx = index.search(q, k)[1]
            exact = index.search_exact(q, k)[1]
            recall[f"recall@{k}"] = round(recall_at_k(approx, exact), 4)
        log.info("search[%s]: %s on %d queries (%s)", teacher, recall, len(q), cfg.index_factory)
    return run.finish(teacher=teacher, depth=_depth_summary(depths), recall=recall,
                      index={"factory": cfg.index_factory, "shards": index.sizes, "dim": index.dim,
                             "num_docs": index.num_docs})


def bm25_search_stage(
    queries: pa.Table,
    corpus: pa.Table,
    positives: pa.Table,
    teacher_cfg: TeacherConfig,
    depth_fn: Callable[[int], int],
    ceiling_fn: Callable[[list[np.ndarray]], np.ndarray] | None,
    cfg: SearchConfig,
    out_uri: str,
    teacher: str = "bm25",
    key_extra: Any = None,
) -> dict[str, Any]:
    """The search stage for the BM25 teacher: same output table and manifest as :func:`search_stage`.

    ``queries`` (QUERY_ID, TEXT), ``corpus`` (DOC_ID, TEXT). BM25 search is exact, so the ceiling is
    applied inside the search. Positive ids absent from the corpus score NaN and are counted."""
    from raymine.bm25 import BM25Teacher

    key = storage.stage_key(STAGE, teacher, to_dict(cfg), to_dict(teacher_cfg), corpus.num_rows,
                            queries.num_rows, key_extra)
    done, run = storage.begin(out_uri, f"{STAGE}:{teacher}", key, config=to_dict(cfg))
    if run is None:
        return done
    run.counts = _new_counts()
    doc_ids = corpus.column(DOC_ID).to_pylist()
    bm25 = BM25Teacher(teacher_cfg)
    bm25.index(doc_ids, corpus.column(TEXT).to_pylist())
    known = set(doc_ids)

    def score_fn(texts: list[str], pos: list[list[str]]) -> list[np.ndarray]:
        present = [[d for d in p if d in known] for p in pos]
        scored = bm25.score(texts, present)
        out = []
        for p, s in zip(pos, scored, strict=True):
            full = np.full(len(p), np.nan, np.float32)
            full[[j for j, d in enumerate(p) if d in known]] = s
            out.append(full)
        return out

    def search_fn(texts: list[str], k: int, ceil: np.ndarray | None):
        ids, scores, above = bm25.search(texts, k, ceil, return_above=True)
        return scores, ids, above

    qids = queries.column(QUERY_ID).to_pylist()
    texts = queries.column(TEXT).to_pylist()
    bs = cfg.query_batch_size
    batches = ((qids[i : i + bs], texts[i : i + bs]) for i in range(0, len(qids), bs))
    depths = _search_batches(batches, _Positives(positives), score_fn, search_fn, depth_fn, ceiling_fn,
                             cfg, out_uri, teacher, run.counts)
    return run.finish(teacher=teacher, depth=_depth_summary(depths), recall=None,
                      index={"factory": "bm25", "num_docs": len(doc_ids)})


__all__ = [
    "SEARCH_SCHEMA", "bm25_search_stage", "search_stage",
]
