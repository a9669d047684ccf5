"""Mining stage: positive-aware filters -> sampling per teacher -> teacher ensembling, on Ray Data.

Input: one candidates table per teacher (search stage output, see ``columns``) and the queries table.
Teachers are joined by query id with Ray Data ``Dataset.join`` (full outer: a query missing from one
teacher is still mined from the others), the query text with a left outer join; no table is
collected on the driver. :func:`mine_batch` (pure pyarrow + numpy, no Ray) does the work per batch,
so the result does not depend on batch boundaries or worker counts.

Output under ``out_uri``: ``mined/*.parquet`` (``MINED_COLUMNS`` + ``NUM_SHORT``), ``dropped.parquet``
(``QUERY_ID, REASON`` [+ ``TEACHER`` when not ensembling]) — every input query is in exactly one of
them — ``report.json``, ``scores.png`` and the stage manifest. Short queries are reported, never
padded with random passages.

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

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymine import columns as C
from raymine import ensemble as E
from raymine import filters as F
from raymine import sampling as S
from raymine import storage
from raymine.config import MineConfig, to_dict
from raymine.ingest import passage_text

log = logging.getLogger(__name__)

_IN_COLS = (C.POSITIVE_IDS, C.POSITIVE_SCORES, C.EXCLUDED_IDS, C.CANDIDATE_IDS, C.CANDIDATE_SCORES)
_FULL_POS = "_full_positive_ids"
_REASON = "_reason"
_STATS = ("present", "no_positive_score", "seen", "drop_positive", "drop_excluded", "drop_method", "kept",
          "requested", "delivered", "known_fn")
_HISTS = ("positive", "kept", "dropped")
_DROPPED_SAMPLE_PER_QUERY = 16  # method-dropped scores kept per query for the histogram


def _tcol(col: str, teacher: str) -> str:
    return f"{col}@{teacher}"


# ------------------------------------------------------------------------------------------------
# Arrow <-> padded numpy
# ------------------------------------------------------------------------------------------------
def _lengths(col: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _pad(flat: np.ndarray, lengths: np.ndarray, fill: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat values + lengths -> (padded ``[nq, K]``, valid ``[nq, K]``)."""
    nq = len(lengths)
    k = max(1, int(lengths.max(initial=0)))  # at least one (invalid) column keeps indexing simple
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if nq else np.zeros(0, np.int64)
    valid = np.arange(k)[None, :] < lengths[:, None]  # [nq, K]
    pos = np.where(valid, starts[:, None] + np.arange(k)[None, :], 0)
    out = np.full((nq, k), fill, dtype=flat.dtype if flat.size else np.asarray(fill).dtype)
    if flat.size:
        out[valid] = flat[pos[valid]]
    return out, valid


def _combine(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


# ------------------------------------------------------------------------------------------------
# One teacher on one batch
# ------------------------------------------------------------------------------------------------
def _mine_teacher(cfg: MineConfig, batch: pa.Table, teacher: str, qids: pa.Array,
                  full_pos: list[set[str]] | None) -> dict[str, Any]:
    """Filters + sampling for one teacher; per-query ordered negatives (chosen first, then other kept)."""
    cols = {c: _combine(batch.column(_tcol(c, teacher))) for c in _IN_COLS}
    nq = batch.num_rows
    present = pc.is_valid(cols[C.CANDIDATE_IDS]).to_numpy(zero_copy_only=False)
    lens = {c: _lengths(cols[c]) for c in _IN_COLS}
    # anchors from the query's own positive scores
    pos_flat = cols[C.POSITIVE_SCORES].flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    pos_flat = np.where(np.isfinite(pos_flat) | np.isnan(pos_flat), pos_flat, np.nan) if pos_flat.size else pos_flat
    anchor = F.reduce_positive_flat(pos_flat, lens[C.POSITIVE_SCORES], cfg.pos_reduce)
    no_pos = present & np.isnan(anchor)
    # one id dictionary for candidates, positives and excluded ids of this batch
    flats = [cols[c].flatten() for c in (C.CANDIDATE_IDS, C.POSITIVE_IDS, C.EXCLUDED_IDS)]
    enc = pc.dictionary_encode(pa.concat_arrays([f.cast(pa.string()) for f in flats]))
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    dictionary = enc.dictionary.to_numpy(zero_copy_only=False)  # [n distinct ids] object
    n_c, n_p = len(flats[0]), len(flats[1])
    cand, valid = _pad(codes[:n_c], lens[C.CANDIDATE_IDS], -1)
    pid, pval = _pad(codes[n_c: n_c + n_p], lens[C.POSITIVE_IDS], -1)
    eid, evalid = _pad(codes[n_c + n_p:], lens[C.EXCLUDED_IDS], -1)
    scores, _ = _pad(cols[C.CANDIDATE_SCORES].flatten().to_numpy(zero_copy_only=False).astype(np.float32),
                     lens[C.CANDIDATE_SCORES], np.float32(-np.inf))
    if scores.shape != cand.shape:
        raise ValueError(f"teacher {teacher}: candidate ids and scores differ in length for some query")
    valid = valid & (present & ~no_pos)[:, None]

    k0, _ = F.drop_positives(cand, valid, pid, pval)
    k1, _ = F.drop_excluded(cand, k0, eid, evalid) if cfg.exclude_identical_text else (k0, 0)
    k2, _ = F.method_filter(cfg, scores, k1, anchor)
    chosen = S.sample(cfg, scores, k2, qids)
    idx, count = S.gather(chosen, cfg.num_negatives)  # [nq, n]
    # replacements for dedup ensembling: the other kept candidates, rank order
    rest_idx, rest_count = S.gather(k2 & ~chosen, k2.shape[1])
    per_row = lambda a, b: (a & ~b).sum(axis=1)  # noqa: E731
    dropped_scores = np.where(k1 & ~k2, scores, np.nan)
    out: dict[str, Any] = {
        "present": present.astype(np.int64), "no_positive_score": no_pos.astype(np.int64),
        "seen": np.where(present & ~no_pos, lens[C.CANDIDATE_IDS], 0), "drop_positive": per_row(valid, k0),
        "drop_excluded": per_row(k0, k1), "drop_method": per_row(k1, k2), "kept": k2.sum(axis=1),
        "requested": np.where(present & ~no_pos, cfg.num_negatives, 0), "delivered": count,
        "anchor": anchor, "no_pos": no_pos, "present_mask": present,
    }
    # corpus docs the search's ceiling removed (positives included); -1 = not reported
    ac = _tcol(C.ABOVE_CEILING, teacher)
    if ac in batch.column_names:
        col = _combine(batch.column(ac))
        out["above_ceiling"] = np.where(present & pc.is_valid(col).to_numpy(zero_copy_only=False),
                                        pc.fill_null(col, -1).to_numpy(zero_copy_only=False), -1).astype(np.int64)
    else:
        out["above_ceiling"] = np.full(nq, -1, np.int64)
    rows = np.arange(nq)[:, None]
    neg_codes = np.where(idx >= 0, cand[rows, np.maximum(idx, 0)], -1)  # [nq, n]
    neg_scores = np.where(idx >= 0, scores[rows, np.maximum(idx, 0)], np.nan)
    rest_codes = np.where(rest_idx >= 0, cand[rows, np.maximum(rest_idx, 0)], -1)
    rest_scores = np.where(rest_idx >= 0, scores[rows, np.maximum(rest_idx, 0)], np.nan)
    out["neg_ids"] = [dictionary[neg_codes[i, : count[i]]] for i in range(nq)]
    out["neg_scores"] = [neg_scores[i, : count[i]] for i in range(nq)]
    out["rest_ids"] = [dictionary[rest_codes[i, : rest_count[i]]] for i in range(nq)]
    out["rest_scores"] = [rest_scores[i, : rest_count[i]] for i in range(nq)]
    out["known_fn"] = np.array(
        [sum(d in full_pos[i] for d in out["neg_ids"][i]) for i in range(nq)] if full_pos else np.zeros(nq),
        dtype=np.int64)
    out["hist_dropped"] = [d[~np.isnan(d)][:_DROPPED_SAMPLE_PER_QUERY] for d in dropped_scores]
    out["hist_positive"] = np.split(pos_flat, np.cumsum(lens[C.POSITIVE_SCORES])[:-1]) if nq else []
    out["positive_ids"] = cols[C.POSITIVE_IDS]
    out["positive_scores"] = cols[C.POSITIVE_SCORES]
    return out


def mine_batch(batch: pa.Table, cfg: MineConfig, teachers: list[str], ensemble: bool) -> pa.Table:
    """Mine one joined batch (pure, no Ray). One row per query (``ensemble``) or per (query, teacher).

    Rows with a non-null ``_reason`` are dropped queries; ``_stat@teacher`` / ``_hist@teacher``
    columns carry the report's per-row counts and score samples.
    """
    nq = batch.num_rows
    qids = _combine(batch.column(C.QUERY_ID)).cast(pa.string())
    qtext = _combine(batch.column(C.QUERY)) if C.QUERY in batch.column_names else pa.nulls(nq, pa.string())
    full_pos = None
    if _FULL_POS in batch.column_names:
        full_pos = [set(x or ()) for x in _combine(batch.column(_FULL_POS)).to_pylist()]
    res = {t: _mine_teacher(cfg, batch, t, qids, full_pos) for t in teachers}
    label = f"{F.method_label(cfg)}/{S.sampling_label(cfg)}"
    u = S.uniforms(S.query_seeds(cfg.seed, qids), 1, S.STREAM_TEACHER)[:, 0]
    unknown = pc.is_null(qtext).to_numpy(zero_copy_only=False)

    out_rows: list[dict[str, Any]] = []  # per output row: fields + index of the source query + teacher mask
    for i in range(nq):
        usable = [t for t in teachers if res[t]["present_mask"][i] and not res[t]["no_pos"][i]]
        groups = [usable] if ensemble else [[t] for t in teachers if res[t]["present_mask"][i]]
        for grp in groups:
            row: dict[str, Any] = {"i": i, "reason": None,
                                   "teachers": [t for t in teachers if res[t]["present_mask"][i]] if ensemble else grp}
            if unknown[i]:
                row["reason"] = "unknown_query"
            elif not [t for t in grp if t in usable]:
                row["reason"] = "no_positive_score"
            else:
                lists = [list(res[t]["neg_ids"][i]) + (list(res[t]["rest_ids"][i]) if ensemble else [])
                         for t in grp]
                picks = E.ensemble(cfg.ensemble, lists, cfg.num_negatives, float(u[i]))
                if not picks:
                    row["reason"] = "no_negatives"
                else:
                    def score(t: str, j: int, i: int = i) -> float:
                        r = res[t]
                        nn = len(r["neg_ids"][i])
                        return float(r["neg_scores"][i][j] if j < nn else r["rest_scores"][i][j - nn])
                    row["neg_ids"] = [lists[ti][j] for ti, j in picks]
                    row["neg_scores"] = [score(grp[ti], j) for ti, j in picks]
                    used = [grp[ti] for ti in sorted({ti for ti, _ in picks})]
                    row["teacher"] = "+".join(used)
                    row["first"] = used[0]
                    row["known_fn"] = sum(d in full_pos[i] for d in row["neg_ids"]) if full_pos else 0
            out_rows.append(row)
    n = len(out_rows)
    src = np.array([r["i"] for r in out_rows], dtype=np.int64)
    mined = [r["reason"] is None for r in out_rows]

    def pos_col(key: str, typ: pa.DataType) -> pa.Array:
        vals = [res[r["first"]][key][r["i"]].as_py() if r["reason"] is None else None for r in out_rows]
        return pa.array(vals, typ)

    arrays: dict[str, pa.Array] = {
        C.QUERY_ID: qids.take(pa.array(src, pa.int64())) if n else pa.array([], pa.string()),
        C.QUERY: qtext.take(pa.array(src, pa.int64())).cast(pa.string()) if n else pa.array([], pa.string()),
        C.POSITIVE_IDS: pos_col("positive_ids", pa.list_(pa.string())),
        C.POSITIVE_SCORES: pos_col("positive_scores", pa.list_(pa.float32())),
        C.NEGATIVE_IDS: pa.array([r.get("neg_ids") for r in out_rows], pa.list_(pa.string())),
        C.NEGATIVE_SCORES: pa.array([r.get("neg_scores") for r in out_rows], pa.list_(pa.float32())),
        C.TEACHER: pa.array([r.get("teacher") if m else "+".join(r["teachers"]) for r, m in zip(out_rows, mined, strict=False)],
                            pa.string()),
        C.METHOD: pa.array([label] * n, pa.string()),
        C.NUM_SHORT: pa.array([cfg.num_negatives - len(r["neg_ids"]) if m else None
                               for r, m in zip(out_rows, mined, strict=False)], pa.int32()),
        _REASON: pa.array([r["reason"] for r in out_rows], pa.string()),
        "_known_fn": pa.array([r.get("known_fn", 0) for r in out_rows], pa.int64()),
        "_delivered": pa.array([len(r.get("neg_ids") or ()) for r in out_rows], pa.int64()),
    }
    # report columns: a teacher's per-query stats go on the first row of that query it belongs to
    for t in teachers:
        owner = np.full(nq, -1, dtype=np.int64)
        for j, r in enumerate(out_rows):
            if t in r["teachers"] and owner[r["i"]] < 0:
                owner[r["i"]] = j
        has = owner >= 0
        for s in _STATS:
            col = np.zeros(n, dtype=np.int64)
            col[owner[has]] = np.asarray(res[t][s])[has]
            arrays[_tcol("_" + s, t)] = pa.array(col, pa.int64())
        above = np.full(n, -1, dtype=np.int64)
        above[owner[has]] = res[t]["above_ceiling"][has]
        arrays[_tcol("_above_ceiling", t)] = pa.array(above, pa.int64(), mask=above < 0)  # null: not reported
        for h, key in (("positive", "hist_positive"), ("kept", "neg_scores"), ("dropped", "hist_dropped")):
            vals: list[Any] = [[] for _ in range(n)]
            for q in np.nonzero(has)[0]:
                v = np.asarray(res[t][key][q], dtype=np.float32)
                vals[owner[q]] = v[np.isfinite(v)]
            arrays[_tcol("_hist_" + h, t)] = pa.array([np.asarray(v, np.float32) for v in vals], pa.list_(pa.float32()))
    return pa.table(arrays)


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
               ensemble: bool = True, full_positives: Any = None, mined_uri: str | None = None) -> dict:
    """Mine hard negatives for every query in the teachers' candidate tables; returns the manifest.

    ``full_positives`` (analysis mode): complete qrels (table, Parquet URI or dict qid -> doc ids);
    the report then gives the known-false-negative rate of the mined negatives.
    Writes the manifest, report, plot and ``dropped.parquet`` under ``out_uri`` and the mined rows
    under ``mined_uri`` (default ``out_uri/mined``).
    """
    import ray

    if not candidates:
        raise ValueError("mine_stage: no candidates tables given")
    teachers = list(candidates)
    mined_uri = mined_uri or storage.join(out_uri, "mined")
    key = storage.stage_key("mine", to_dict(cfg), candidates, queries_uri, ensemble, mined_uri,
                            None if full_positives is None else "full_positives")
    done = storage.completed(out_uri, key)
    if done is not None and full_positives is None:
        log.info("mine: already done in %s", out_uri)
        return done
    run = storage.StageRun(out_uri, "mine", key, config=to_dict(cfg))
    agg_args = {"num_cpus": 0.25}
    ds = None
    for t in teachers:
        # ABOVE_CEILING is optional: candidates written before it existed are still mined
        extra = [C.ABOVE_CEILING] if C.ABOVE_CEILING in _dataset(candidates[t]).schema.names else []
        d = ray.data.read_parquet(candidates[t]).select_columns([C.QUERY_ID, *_IN_COLS, *extra])
        d = d.rename_columns({c: _tcol(c, t) for c in (*_IN_COLS, *extra)})
        ds = d if ds is None else ds.join(d, "full_outer", cfg.join_partitions, on=(C.QUERY_ID,),
                                          aggregator_ray_remote_args=agg_args)
    queries = ray.data.read_parquet(queries_uri).select_columns([C.QUERY_ID, C.TEXT]).rename_columns(
        {C.TEXT: C.QUERY})
    ds = ds.join(queries, "left_outer", cfg.join_partitions, on=(C.QUERY_ID,), aggregator_ray_remote_args=agg_args)
    if full_positives is not None:
        fp = ray.data.from_arrow(_positives_lists(full_positives))
        ds = ds.join(fp, "left_outer", cfg.join_partitions, on=(C.QUERY_ID,), aggregator_ray_remote_args=agg_args)
    out = ds.map_batches(mine_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                         fn_kwargs={"cfg": cfg, "teachers": teachers, "ensemble": ensemble}).materialize()

    storage.makedirs(out_uri)
    report = _report_and_dropped(out, cfg, teachers, ensemble, out_uri, full_positives is not None)
    storage.delete_dir(mined_uri)
    out.map_batches(_mined_only, batch_format="pyarrow").write_parquet(mined_uri)
    run.counts.update(report["totals"])
    manifest = run.finish(report=report, teachers=teachers, ensemble=ensemble, candidates=candidates,
                          mined=mined_uri, dropped=storage.join(out_uri, "dropped.parquet"))
    return manifest


def _mined_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[_REASON])).select([*C.MINED_COLUMNS, C.NUM_SHORT])


def _report_and_dropped(out, cfg: MineConfig, teachers: list[str], ensemble: bool, out_uri: str,
                        analysis: bool) -> dict:
    """Stream the stage output once: write dropped.parquet, sum the stats, sample scores, plot."""
    import pyarrow.parquet as pq

    stats = {t: dict.fromkeys(_STATS, 0) for t in teachers}
    hists: dict[str, dict[str, list[np.ndarray]]] = {t: {h: [] for h in _HISTS} for t in teachers}
    hist_n = {t: dict.fromkeys(_HISTS, 0) for t in teachers}
    above: dict[str, list[np.ndarray]] = {t: [] for t in teachers}  # per-query above-ceiling counts
    totals = {"queries_out": 0, "mined": 0, "dropped": 0, "requested": 0, "delivered": 0, "short_queries": 0,
              "known_fn": 0}
    reasons: dict[str, int] = {}
    keys: list[np.ndarray] = []  # 64-bit hashes of output keys: a duplicated input query id multiplies join rows
    fs, path = storage.resolve(storage.join(out_uri, "dropped.parquet"))
    schema = pa.schema([(C.QUERY_ID, pa.string()), (C.REASON, pa.string())]
                       + ([] if ensemble else [(C.TEACHER, pa.string())]))
    with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as writer:
        for b in out.iter_batches(batch_format="pyarrow", batch_size=8192):
            reason = b[_REASON]
            k = _combine(b[C.QUERY_ID]) if ensemble else _combine(
                pc.binary_join_element_wise(b[C.QUERY_ID], b[C.TEACHER], "\x1f"))
            keys.append(S.fnv1a64(k))
            is_drop = pc.is_valid(reason)
            d = b.filter(is_drop)
            if d.num_rows:
                cols = {C.QUERY_ID: d[C.QUERY_ID], C.REASON: d[_REASON]}
                if not ensemble:
                    cols[C.TEACHER] = d[C.TEACHER]
                writer.write_table(pa.table(cols, schema=schema))
                for r, c in zip(*np.unique(d[_REASON].to_numpy(zero_copy_only=False), return_counts=True), strict=False):
                    reasons[str(r)] = reasons.get(str(r), 0) + int(c)
            m = b.filter(pc.invert(is_drop))
            totals["queries_out"] += b.num_rows
            totals["mined"] += m.num_rows
            totals["dropped"] += d.num_rows
            totals["requested"] += m.num_rows * cfg.num_negatives
            totals["delivered"] += int(pc.sum(m["_delivered"]).as_py() or 0)
            totals["short_queries"] += int(pc.sum(pc.greater(m[C.NUM_SHORT], 0)).as_py() or 0)
            totals["known_fn"] += int(pc.sum(m["_known_fn"]).as_py() or 0)
            for t in teachers:
                for s in _STATS:
                    stats[t][s] += int(pc.sum(b[_tcol("_" + s, t)]).as_py() or 0)
                a = _combine(pc.drop_null(b[_tcol("_above_ceiling", t)]))
                above[t].append(a.to_numpy(zero_copy_only=False).astype(np.int64))
                for h in _HISTS:
                    if hist_n[t][h] < cfg.report_sample:
                        v = b[_tcol("_hist_" + h, t)].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                        v = v[: cfg.report_sample - hist_n[t][h]]
                        hists[t][h].append(v)
                        hist_n[t][h] += len(v)
    allk = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    if len(np.unique(allk)) != len(allk):
        raise ValueError("mine: duplicated query ids in a candidates table (output keys repeat); "
                         "each teacher's table must hold one row per query")
    totals["missing"] = totals["requested"] - totals["delivered"]
    totals["shortfall"] = totals["missing"] / totals["requested"] if totals["requested"] else 0.0
    if analysis:
        totals["known_false_negative_rate"] = totals["known_fn"] / totals["delivered"] if totals["delivered"] else 0.0
    per_teacher = {}
    for t in teachers:
        s = dict(stats[t])
        s["short"] = s["requested"] - s["delivered"]
        s["shortfall"] = s["short"] / s["requested"] if s["requested"] else 0.0
        if analysis:
            s["known_false_negative_rate"] = s["known_fn"] / s["delivered"] if s["delivered"] else 0.0
        a = np.concatenate(above[t]) if above[t] else np.zeros(0, np.int64)
        s["above_ceiling_queries"] = int(a.size)  # 0: candidates table without ABOVE_CEILING
        s["above_ceiling"] = int(a.sum()) if a.size else None
        s["above_ceiling_median"] = float(np.median(a)) if a.size else None
        per_teacher[t] = s
    method = f"{F.method_label(cfg)}/{S.sampling_label(cfg)}"
    report = {"method": method, "ensemble": cfg.ensemble if ensemble and len(teachers) > 1 else None,
              "totals": totals, "dropped_reasons": reasons, "per_teacher": per_teacher}
    samples = {t: {h: np.concatenate(hists[t][h]) if hists[t][h] else np.zeros(0, np.float32) for h in _HISTS}
               for t in teachers}
    try:
        plot_scores(samples, method, storage.join(out_uri, "scores.png"))
        report["plot"] = storage.join(out_uri, "scores.png")
    except Exception as e:  # a plot must not lose the mined data; say why it is missing
        log.warning("mine: score plot not written: %s", e)
        report["plot_error"] = str(e)
    storage.write_json(storage.join(out_uri, "report.json"), report)
    in_search = {t: per_teacher[t]["above_ceiling"] for t in teachers}
    log.info("mine %s: %s; removed by the ceiling inside the search (positives included): %s", method,
             json.dumps(totals), json.dumps(in_search))
    return report


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


# ------------------------------------------------------------------------------------------------
# Exports
# ------------------------------------------------------------------------------------------------
def _dataset(uri: str):
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet")


def _texts_for(corpus_uri: str, needed: set[str], batch_size: int = 65_536) -> dict[str, str]:
    """Passage texts of only the needed ids, streaming the corpus once (never all of it in memory)."""
    want = pa.array(sorted(needed), pa.string())
    texts: dict[str, str] = {}
    cols = [C.DOC_ID, C.TEXT] + ([C.TITLE] if C.TITLE in _dataset(corpus_uri).schema.names else [])
    for b in _dataset(corpus_uri).to_batches(columns=cols, batch_size=batch_size):
        ids = pc.cast(b.column(C.DOC_ID), pa.string())
        hit = pc.is_in(ids, value_set=want)
        if not pc.any(hit).as_py():
            continue
        sub = pa.Table.from_batches([b]).filter(hit)
        titles = sub[C.TITLE].to_pylist() if C.TITLE in cols else [None] * sub.num_rows
        for d, ti, te in zip(pc.cast(sub[C.DOC_ID], pa.string()).to_pylist(), titles, sub[C.TEXT].to_pylist(), strict=False):
            texts[d] = passage_text(ti, te)
    return texts


def _needed_ids(mined_uri: str) -> set[str]:
    needed: set[str] = set()
    for b in _dataset(mined_uri).to_batches(columns=[C.POSITIVE_IDS, C.NEGATIVE_IDS]):
        for c in (C.POSITIVE_IDS, C.NEGATIVE_IDS):
            needed.update(b.column(c).flatten().to_pylist())
    return needed


def _mined_rows(mined_uri: str) -> Iterable[dict[str, Any]]:
    cols = [C.QUERY_ID, C.QUERY, C.POSITIVE_IDS, C.NEGATIVE_IDS]
    for b in _dataset(mined_uri).to_batches(columns=cols):
        yield from b.to_pylist()


def export_sentence_transformers(mined_uri: str, corpus_uri: str, out_uri: str, num_negatives: int) -> dict:
    """Parquet ``anchor, positive, negative_1..n``: one row per (query, positive).

    A query with fewer than ``num_negatives`` negatives cannot fill the fixed columns: its rows are
    left out and counted (``short_rows``), never padded; ids missing from the corpus likewise
    (``missing_text_rows``). Returns the counts.
    """
    import pyarrow.parquet as pq

    texts = _texts_for(corpus_uri, _needed_ids(mined_uri))
    schema = pa.schema([(C.ANCHOR, pa.string()), (C.POSITIVE, pa.string())]
                       + [(C.negative_column(i + 1), pa.string()) for i in range(num_negatives)])
    counts = {"rows": 0, "queries": 0, "short_rows": 0, "missing_text_rows": 0}
    fs, path = storage.resolve(out_uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    buf: list[dict[str, str]] = []
    with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as writer:
        for r in _mined_rows(mined_uri):
            negs = r[C.NEGATIVE_IDS][:num_negatives]
            npos = len(r[C.POSITIVE_IDS])
            if len(negs) < num_negatives:
                counts["short_rows"] += npos
                continue
            if any(d not in texts for d in negs):
                counts["missing_text_rows"] += npos
                continue
            counts["queries"] += 1
            for p in r[C.POSITIVE_IDS]:
                if p not in texts:
                    counts["missing_text_rows"] += 1
                    continue
                row = {C.ANCHOR: r[C.QUERY], C.POSITIVE: texts[p]}
                row.update({C.negative_column(i + 1): texts[d] for i, d in enumerate(negs)})
                buf.append(row)
            if len(buf) >= 4096:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                counts["rows"] += len(buf)
                buf = []
        if buf:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
            counts["rows"] += len(buf)
    log.info("sentence-transformers export %s: %s", out_uri, counts)
    return counts


def export_flagembedding(mined_uri: str, corpus_uri: str, out_path: str) -> dict:
    """FlagEmbedding jsonl, one line per query: ``{"query", "pos": [...], "neg": [...]}`` (all its negatives)."""
    texts = _texts_for(corpus_uri, _needed_ids(mined_uri))
    counts = {"queries": 0, "missing_texts": 0, "no_positive_text": 0}
    fs, path = storage.resolve(out_path)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as sink:
        for r in _mined_rows(mined_uri):
            pos = [texts[d] for d in r[C.POSITIVE_IDS] if d in texts]
            neg = [texts[d] for d in r[C.NEGATIVE_IDS] if d in texts]
            counts["missing_texts"] += len(r[C.POSITIVE_IDS]) + len(r[C.NEGATIVE_IDS]) - len(pos) - len(neg)
            if not pos:
                counts["no_positive_text"] += 1
                continue
            counts["queries"] += 1
            sink.write((json.dumps({"query": r[C.QUERY], "pos": pos, "neg": neg}, ensure_ascii=False) + "\n").encode())
    log.info("FlagEmbedding export %s: %s", out_path, counts)
    return counts
