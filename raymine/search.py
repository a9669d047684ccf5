"""Search stage: every training query's candidates from one teacher, with the mining method's per-query
score ceiling applied inside the search (``raymine.index`` for the sharded FAISS index, ``raymine.bm25``
for the sharded BM25 index). Output: one row per query (``SEARCH_SCHEMA``), Parquet parts + manifest.

The driver starts the shard actors and plans query *pieces* (``raymine.parts``, from Parquet footers);
Ray Data tasks take one piece each, read its queries (ids, positives, excluded ids, text or the aligned
query-embedding part), ask every shard through the index client, merge, and write output part ``i`` for
piece ``i`` themselves. The driver sums per-piece counts (and each part's rows and bytes, reported with
its write) only. A re-run after a crash (driver, node) searches only the pieces whose part is missing or
damaged; the stage key leaves out resources (task counts, CPUs, threads, and the shard count where the
merge is exact), so a run resumed on a resized cluster keeps every finished part.

What is searched for each query is a pure function of the config (:func:`search_plan`): its depth
(``required_depth`` + slack, or ``search.depth``) and its score ceiling (the mining method's, from the
query's exact positive scores), so the positive-aware methods get their negatives in one pass.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import parts, storage
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
from raymine.config import MineConfig, SearchConfig, TeacherConfig, to_dict
from raymine.index import _embeddings, recall_at_k

log = logging.getLogger(__name__)

STAGE = "search"

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
# What to search: a pure function of the config (no Ray)
# ------------------------------------------------------------------------------------------------
def search_plan(mine: MineConfig, search: SearchConfig, pos_scores: Sequence[np.ndarray], num_known: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(depth int64 [nq], ceiling float32 [nq]) of each query.

    depth: ``search.depth`` when set, else ``required_depth(mine, positives + excluded) + depth_slack``.
    ceiling: the mining method's ceiling from the query's positive scores (missing positives, NaN, left
    out; NaN when none is left: mining drops that query), +inf when ``search.use_ceiling`` is off."""
    from raymine.filters import required_depth, score_ceiling

    nq = len(pos_scores)
    n = np.asarray(num_known, np.int64).reshape(-1)
    if search.depth > 0:
        depth = np.full(nq, search.depth, np.int64)
    else:
        depth = np.fromiter((required_depth(mine, int(x)) + search.depth_slack for x in n), np.int64, nq)
    if not search.use_ceiling:
        return depth, np.full(nq, np.inf, np.float32)
    ceil = np.asarray(score_ceiling(mine, [s[~np.isnan(s)] for s in pos_scores]), np.float32).reshape(-1)
    return depth, ceil


def hide_in_piece(qids: list[str], pos: list[list[str]], fraction: float, seed: int) -> tuple[list[list[str]], int]:
    """Analysis mode: the visible positives of each query (``mine.hide_positives``: seeded by ids only, so a
    piece gives the same answer as the whole table) and how many were hidden."""
    from raymine.mine import hide_positives

    flat = pa.table({QUERY_ID: pa.array([q for q, ps in zip(qids, pos, strict=True) for _ in ps], pa.string()),
                     DOC_ID: pa.array([d for ps in pos for d in ps], pa.string())})
    visible, hidden = hide_positives(flat, fraction, seed)
    keep: dict[str, set[str]] = {}
    for q, d in zip(visible.column(QUERY_ID).to_pylist(), visible.column(DOC_ID).to_pylist(), strict=True):
        keep.setdefault(q, set()).add(d)
    return [[d for d in ps if d in keep.get(q, ())] for q, ps in zip(qids, pos, strict=True)], hidden.num_rows


# ------------------------------------------------------------------------------------------------
# The search task: one query piece in, one part written
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpec:
    """Everything a search task needs (picklable): where the queries are, where to write, the configs."""

    teacher: str
    queries_uri: str  # QUERY_ID, TEXT, POSITIVE_IDS, EXCLUDED_IDS (the ingest stage's train queries)
    query_emb_uri: str | None  # dense teachers: query embeddings, part i = piece i of queries_uri
    out_uri: str
    mine: MineConfig
    search: SearchConfig
    rows_per_piece: int


COUNTS = ("queries", "positives_not_found", "queries_with_positive_not_found", "ceiling_nan", "queries_short",
          "candidates", "short_below_ceiling_at_max_depth", "above_ceiling", "hidden_positives",
          "depth_capped_at_corpus")


def _query_payload(spec: SearchSpec, i: int, table: pa.Table, dense: bool):
    if not dense:
        return table.column(TEXT).to_pylist()
    emb = pq.read_table(parts.find_part(spec.query_emb_uri, i), filesystem=storage.resolve(spec.query_emb_uri)[0])
    if emb.column(QUERY_ID).to_pylist() != table.column(QUERY_ID).to_pylist():
        raise ValueError(f"{spec.query_emb_uri}: part {i} does not hold the queries of piece {i} of "
                         f"{spec.queries_uri}; re-run the embed stage")
    return _embeddings(emb.column(EMBEDDING), emb.schema.field(EMBEDDING).type.list_size)


def depth_groups(depth: np.ndarray) -> list[np.ndarray]:
    """Query rows grouped by depth rounded up to a power of two: each group is searched at its own largest
    depth, so one query with a long excluded-id list (a cluster of identical passages) deepens its group's
    search only, not the whole batch's; within a group the depth at most doubles."""
    d = np.asarray(depth, np.int64)
    bucket = np.where(d > 0, np.ceil(np.log2(np.maximum(d, 1))), -1).astype(np.int64)
    return [np.flatnonzero(bucket == b) for b in np.unique(bucket)]


def _search_by_depth(index: Any, payload: np.ndarray, depth: np.ndarray, ceilings: np.ndarray | None):
    """``index.search_batch`` per :func:`depth_groups` group, laid out as one search at the batch's largest
    depth: (scores [nq, k], ids [nq, k], above int64 [nq], short); a row holds its top ``depth`` (exact search:
    the same rows a search at the largest depth gives, since each is a prefix of the deeper one)."""
    nq, k = len(depth), int(np.max(depth, initial=0))
    scores, ids = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), "", dtype=object)
    above, short = np.zeros(nq, np.int64), 0
    groups = depth_groups(depth)
    for g in groups:
        kg = int(depth[g].max())
        sub = payload if len(groups) == 1 else (
            payload[g] if isinstance(payload, np.ndarray) else [payload[j] for j in g])  # vectors / BM25 texts
        s, i, a, sh = index.search_batch(sub, kg, ceilings if ceilings is None or len(groups) == 1 else ceilings[g])
        scores[g, :kg], ids[g, :kg] = s, i
        above[g] = np.asarray(a, np.int64).reshape(-1)
        short += int(sh)
    return scores, ids, above, short


def search_piece(index: Any, spec: SearchSpec, i: int, piece: dict, dense: bool) -> dict[str, int]:
    """Search the queries of one piece and write part ``i``; returns its counts and the part's ``rows`` and
    ``bytes``."""
    counts = dict.fromkeys(COUNTS, 0)
    table = parts.read_piece(spec.queries_uri, piece, [QUERY_ID, TEXT, POSITIVE_IDS, EXCLUDED_IDS])
    qids = table.column(QUERY_ID).to_pylist()
    pos = [p or [] for p in table.column(POSITIVE_IDS).to_pylist()]
    exc = [e or [] for e in table.column(EXCLUDED_IDS).to_pylist()]
    if spec.mine.hide_positive_fraction > 0:
        pos, counts["hidden_positives"] = hide_in_piece(qids, pos, spec.mine.hide_positive_fraction, spec.mine.seed)
    payload_all = _query_payload(spec, i, table, dense)
    out = []
    bs = max(1, spec.search.query_batch_size)
    for lo in range(0, len(qids), bs):
        sl = slice(lo, lo + bs)
        payload = payload_all[sl]
        p, e = pos[sl], exc[sl]
        nq = len(p)
        pos_scores = index.lookup_scores(payload, p)
        missing = np.fromiter((int(np.isnan(s).sum()) for s in pos_scores), np.int64, nq)
        counts["positives_not_found"] += int(missing.sum())
        counts["queries_with_positive_not_found"] += int((missing > 0).sum())
        depth, ceil = search_plan(spec.mine, spec.search, pos_scores,
                                  np.fromiter((len(a) + len(b) for a, b in zip(p, e, strict=True)), np.int64, nq))
        capped = depth > index.num_docs  # a corpus smaller than the depth: every doc is a candidate
        counts["depth_capped_at_corpus"] += int(capped.sum())
        depth = np.minimum(depth, index.num_docs)
        counts["ceiling_nan"] += int(np.isnan(ceil).sum())
        use = spec.search.use_ceiling
        scores, ids, above, short = _search_by_depth(index, payload, depth,
                                                     np.where(np.isnan(ceil), np.inf, ceil) if use else None)
        above = above if use else np.zeros(nq, np.int64)
        counts["above_ceiling"] += int(above.sum())
        counts["short_below_ceiling_at_max_depth"] += int(short)
        keep = (ids != "") & (np.arange(ids.shape[1])[None, :] < depth[:, None])  # [nq, k]
        counts["queries_short"] += int((keep.sum(axis=1) < depth).sum())
        cand_ids = [ids[j][keep[j]] for j in range(nq)]
        cand_scores = [scores[j][keep[j]] for j in range(nq)]
        counts["candidates"] += int(keep.sum())
        counts["queries"] += nq
        out.append(pa.table({
            QUERY_ID: pa.array(qids[sl], pa.string()),
            POSITIVE_IDS: pa.array(p, pa.list_(pa.string())),
            POSITIVE_SCORES: _list_array([np.asarray(s, np.float32) for s in pos_scores], pa.float32()),
            EXCLUDED_IDS: pa.array(e, pa.list_(pa.string())),
            CANDIDATE_IDS: _list_array(cand_ids, pa.string()),
            CANDIDATE_SCORES: _list_array(cand_scores, pa.float32()),
            CEILING: pa.array(ceil, pa.float32()),
            TEACHER: pa.array([spec.teacher] * nq, pa.string()),
            ABOVE_CEILING: pa.array(above, pa.int64()),
        }, schema=SEARCH_SCHEMA))
    table = pa.concat_tables(out) if out else SEARCH_SCHEMA.empty_table()
    counts["bytes"] = parts.write_part_sized(table, spec.out_uri, i)[1]
    counts["rows"] = table.num_rows
    return counts


def _search_batch(batch: dict[str, np.ndarray], index: Any, spec: SearchSpec, dense: bool) -> dict[str, np.ndarray]:
    """``map_batches`` body (a Ray task): each row is one piece; the index client travels in ``fn_kwargs``.

    Tasks, not an actor pool: the client holds only actor handles, so a task needs no state of its own,
    and tasks run in Ray's already-started workers (an actor pool starts fresh processes: ~1 s here)."""
    rows = []
    for j in range(len(batch["part"])):
        piece = {k: batch[k][j] for k in ("path", "row_group", "lo", "hi")}
        rows.append(search_piece(index, spec, int(batch["part"][j]), piece, dense))
    return {"part": np.asarray(batch["part"], np.int64),
            **{k: np.array([r[k] for r in rows], np.int64) for k in (*COUNTS, "rows", "bytes")}}


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


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
# mining keys that do not change what is searched (depth and ceiling come from the others)
_NOT_SEARCHED = ("batch_size", "join_partitions", "report_sample", "ensemble", "exclude_identical_text",
                 "sample_weighting", "sample_temperature")


# search keys that are resources: they change how fast, never what is found
# resources, and settings whose results are equal by construction (a streamed shard merges exactly; a
# low-precision GEMM is re-scored in float32 near the k-th score and the ceiling: topk.streamed_search)
_RESOURCES = ("num_cpus_per_shard", "threads_per_shard", "search_tasks", "num_cpus_per_task", "shard_block_bytes",
              "shard_memory_overhead_mb", "score_dtype")


def search_key_config(search: SearchConfig, dense: bool) -> dict[str, Any]:
    """What of the search config decides the candidates. Resources are left out, GPUs kept only as CPU vs GPU
    (another device, other score bits), and the shard count too where the merge is exact (Flat, BM25: every
    shard scores its rows exactly, the merge keeps the global top-k with ties by id); an IVF/PQ index's
    shards are trained apart, so their number stays in."""
    from raymine.index import _is_exact

    key = {k: v for k, v in to_dict(search).items() if k not in _RESOURCES}
    key["num_gpus_per_shard"] = search.num_gpus_per_shard > 0
    if not dense or _is_exact(search.index_factory):
        key.pop("num_shards")
    return key


def stage_key(spec: SearchSpec, upstream: Any) -> str:
    """The search stage's key for one teacher: its spec plus the keys of the stages it reads. Mining keys
    that do not change the search are left out (a new mining seed re-mines without re-searching; the seed
    counts only when it chooses hidden positives), and so are resources (:func:`search_key_config`)."""
    mine = {k: v for k, v in to_dict(spec.mine).items() if k not in _NOT_SEARCHED}
    if spec.mine.hide_positive_fraction == 0:
        mine.pop("seed", None)
    return storage.stage_key(STAGE, spec.teacher, search_key_config(spec.search, spec.query_emb_uri is not None),
                             mine, spec.queries_uri, spec.query_emb_uri, spec.rows_per_piece, upstream)


def search_teacher(index: Any, spec: SearchSpec, key: Any, dense: bool) -> dict[str, Any]:
    """Candidates of every training query for one teacher → ``spec.out_uri`` parts + manifest.

    ``index``: a started index client (``ShardedIndex`` / ``ShardedBM25``) over the teacher's corpus;
    ``key``: what decides the output besides ``spec`` (the upstream stages' keys). Skipped when done;
    resumed per part. ``ABOVE_CEILING``: corpus docs scoring ``>= ceiling`` (the ceiling's removals,
    positives included; exact for Flat and BM25, a lower bound for IVF/PQ; 0 without a ceiling)."""
    import ray

    done, run = storage.begin(spec.out_uri, f"{STAGE}:{spec.teacher}", stage_key(spec, key), config=to_dict(spec.search),
                              resume=True)
    if run is None:
        return done
    pieces = parts.plan_pieces(spec.queries_uri, spec.rows_per_piece)
    plan = np.fromiter((p.rows for p in pieces), np.int64, len(pieces))
    have, nbytes = parts.kept_parts(spec.out_uri, plan)  # one listing; footers checked by Ray tasks
    rows = np.where(have, plan, -1)
    todo = [{**p.to_row(), "part": i} for i, p in enumerate(pieces) if not have[i]]
    if len(todo) < len(pieces):
        log.info("search[%s]: resuming, %d of %d part(s) already written", spec.teacher, len(pieces) - len(todo),
                 len(pieces))
    counts = dict.fromkeys(COUNTS, 0)
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _search_batch, fn_kwargs={"index": index, "spec": spec, "dense": dense},
            batch_size=1, batch_format="numpy", num_cpus=spec.search.num_cpus_per_task,
            concurrency=max(1, min(spec.search.search_tasks, len(todo))))
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in COUNTS:
                counts[k] += int(np.asarray(b[k]).sum())
            rows[b["part"]], nbytes[b["part"]] = b["rows"], b["bytes"]
    total = int(plan.sum())
    if not np.array_equal(rows, plan):  # every part kept or reported by its task, with its piece's rows
        raise RuntimeError(f"search[{spec.teacher}]: {int(rows[rows > 0].sum())} rows in {int((rows >= 0).sum())} "
                           f"part(s) written, the queries table has {total} in {len(plan)} piece(s)")
    run.counts.update({**counts, "queries_total": total, "pieces": len(todo), "parts_kept": len(pieces) - len(todo)})
    recall = _recall(index, spec) if dense and not index.exact else None
    records = storage.part_table([parts.part_name(i) for i in range(len(plan))], nbytes, rows)
    return run.finish(parts=records, teacher=spec.teacher, recall=recall,
                      index={"factory": "bm25" if not dense else spec.search.index_factory,
                             "shards": getattr(index, "sizes", None), "num_docs": index.num_docs})


def _recall(index: Any, spec: SearchSpec) -> dict[str, float] | None:
    """recall@k of the approximate index against exact search on the first ``recall_sample`` queries."""
    if spec.search.recall_sample <= 0:
        return None
    fs, _ = storage.resolve(spec.query_emb_uri)
    batches, n = [], 0
    for path in parts.list_parquet(spec.query_emb_uri):
        t = pq.read_table(path, filesystem=fs, columns=[EMBEDDING])
        batches.append(_embeddings(t.column(EMBEDDING), t.schema.field(EMBEDDING).type.list_size))
        n += t.num_rows
        if n >= spec.search.recall_sample:
            break
    if not batches:
        return None
    q = np.concatenate(batches)[: spec.search.recall_sample]  # [n_sample, d]
    out = {}
    for k in sorted({10, min(100, index.num_docs)}):
        out[f"recall@{k}"] = round(recall_at_k(index.search(q, k)[1], index.search_exact(q, k)[1]), 4)
    log.info("search[%s]: %s on %d queries (%s)", spec.teacher, out, len(q), spec.search.index_factory)
    return out


def open_index(teacher: TeacherConfig, search: SearchConfig, corpus_uri: str, corpus_emb_uri: str | None):
    """The started index client of one teacher: sharded FAISS over its corpus embeddings (dense), or
    sharded BM25 over the corpus passages. Use as a context manager (frees the shard actors)."""
    from dataclasses import replace

    docs = parts.num_rows(corpus_emb_uri if teacher.kind != "bm25" else corpus_uri)
    if search.num_shards > max(1, docs):
        log.warning("search: %d shards requested for %d documents; using %d (lower search.num_shards)",
                    search.num_shards, docs, max(1, docs))
        search = replace(search, num_shards=max(1, docs))
    if teacher.kind != "bm25":  # dense or served: the embed stage's vectors
        from raymine.index import ShardedIndex

        return ShardedIndex.from_parquet(corpus_emb_uri, search)
    from raymine.bm25 import ShardedBM25

    return ShardedBM25.from_parquet(corpus_uri, teacher, search)


__all__ = ["SEARCH_SCHEMA", "SearchSpec", "open_index", "search_plan", "search_teacher"]
