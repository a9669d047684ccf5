"""Validation split for model selection: which queries, which passages, and the score the workers compute.

The train stage keeps the checkpoint that scores best here (never the test split). Validation queries are
the data's ``dev`` split when it has one, else a seeded slice of the training queries chosen *by query id*
(:func:`holdout_mask`: a hash of (seed, id) below a share), taken out of mining and training after the
embed and search stages, so nothing is embedded twice. The pool each validation query is ranked in: its
judged passages, its top-k teacher candidates (the hard part: what the student must keep below the
positives) and a seeded random fill up to ``validation.pool_size`` — small enough that the training
workers encode it in seconds at every validation point, the same pool at every point.

Score: nDCG@10 from mteb's own retrieval scoring (``calculate_retrieval_scores``, pytrec_eval underneath),
the code behind the evaluate stage's figures, on the top-100 of each query's ranking of the pool.

Written under ``OUTPUT/validation/``: ``queries.parquet`` (QUERY_ID, TEXT, POSITIVE_IDS — the positives the
job sees), ``pool.parquet`` (DOC_ID, PASSAGE) and the manifest. Both tables are validation-sized (the
driver holds them, as it holds a test split); the corpus and the candidate tables are read by Ray Data
tasks that keep only the validation rows.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from raymine import columns as C
from raymine import storage

log = logging.getLogger(__name__)

QUERIES_FILE = "queries.parquet"
POOL_FILE = "pool.parquet"
RANKING_DEPTH = 100  # each query's ranking handed to the scorer (nDCG@10 needs the first 10)
QUERY_SCHEMA = pa.schema([(C.QUERY_ID, pa.string()), (C.TEXT, pa.string()), (C.POSITIVE_IDS, pa.list_(pa.string()))])
POOL_SCHEMA = pa.schema([(C.DOC_ID, pa.string()), (C.PASSAGE, pa.string())])


# ------------------------------------------------------------------------------------------------
# Pure rules
# ------------------------------------------------------------------------------------------------
def unit_hash(seed: int, salt: str, ids: Sequence[str]) -> np.ndarray:
    """A number in [0, 1) per id from a hash of (seed, salt, id): independent of order and partitioning."""
    out = np.empty(len(ids), dtype=np.float64)
    prefix = f"{seed}\x1f{salt}\x1f".encode()
    for i, x in enumerate(ids):
        h = hashlib.blake2b(prefix + str(x).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out  # [N]


def slice_share(fraction: float, max_queries: int, num_queries: int) -> float:
    """Share of the training queries held out: ``fraction``, lowered so about ``max_queries`` are held out."""
    if num_queries <= 0:
        return 0.0
    return min(fraction, max_queries / num_queries)


def holdout_mask(query_ids: Sequence[str], seed: int, share: float) -> np.ndarray:
    """True for the training queries held out for validation: a rule of (seed, query id) alone."""
    return unit_hash(seed, "validation", query_ids) < share  # [N] bool


def validation_points(total_steps: int, every: int) -> list[int]:
    """Steps after which the workers validate: 0 (the base model), every ``every`` steps, and the last step.

    ``every=0``: two points after step 0 (mid-run and the last step: every ceil(total / 2) steps)."""
    if total_steps <= 0:
        return [0]
    every = every or max(1, -(-total_steps // 2))
    return sorted({0, *range(every, total_steps, every), total_steps})


def retrieval_ndcg(query_ids: Sequence[str], pool_ids: Sequence[str], scores: np.ndarray,
                   relevant: Mapping[str, Sequence[str]], k: int = 10) -> float:
    """nDCG@k of each query's ranking of the pool, averaged over queries, with mteb's retrieval scoring.

    ``scores`` [Q, P]: query × pool passage. ``relevant``: query id → judged relevant doc ids (grade 1).
    Ties in score rank by pool order (pytrec_eval sorts by score, then by doc id descending: mteb's rule).
    """
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    depth = min(RANKING_DEPTH, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # [Q, depth]
    run = {q: {pool_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(query_ids)}
    qrels = {q: {d: 1 for d in relevant.get(q, ())} for q in query_ids}
    res = calculate_retrieval_scores(run, qrels, [k])
    return float(res.ndcg[f"NDCG@{k}"])


def best_point(curve: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """(step, score) of the best validation point; ties go to the earlier step."""
    best = curve[0]
    for step, score in curve[1:]:
        if score > best[1]:
            best = (step, score)
    return best


# ------------------------------------------------------------------------------------------------
# Ray Data steps (pyarrow in, pyarrow out)
# ------------------------------------------------------------------------------------------------
def held_out_rows(batch: pa.Table, seed: int, share: float) -> pa.Table:
    """Rows of a query table whose QUERY_ID is held out for validation."""
    if batch.num_rows == 0:
        return batch
    return batch.filter(pa.array(holdout_mask(batch.column(C.QUERY_ID).to_pylist(), seed, share)))


def pool_rows(batch: pa.Table, wanted: frozenset[str], seed: int, fill_share: float) -> pa.Table:
    """Corpus rows in the pool: the ``wanted`` ids (judged + candidates) and the seeded random fill."""
    ids = batch.column(C.DOC_ID).to_pylist()
    keep = np.fromiter((d in wanted for d in ids), bool, len(ids))
    if fill_share > 0:
        keep |= unit_hash(seed, "pool", ids) < fill_share
    return batch.filter(pa.array(keep)).select([C.DOC_ID, C.PASSAGE])


# ------------------------------------------------------------------------------------------------
# Encoding + scoring inside a training worker (no Ray: plain torch)
# ------------------------------------------------------------------------------------------------
class ValidationSet:
    """The validation queries and pool as a training worker holds them (validation-sized lists)."""

    def __init__(self, folder: str) -> None:
        import pyarrow.parquet as pq

        fs, root = storage.resolve(folder)
        q = pq.read_table(f"{root.rstrip('/')}/{QUERIES_FILE}", filesystem=fs)
        p = pq.read_table(f"{root.rstrip('/')}/{POOL_FILE}", filesystem=fs)
        self.query_ids: list[str] = q.column(C.QUERY_ID).to_pylist()
        self.queries: list[str] = q.column(C.TEXT).to_pylist()
        self.relevant = dict(zip(self.query_ids, q.column(C.POSITIVE_IDS).to_pylist(), strict=True))
        self.pool_ids: list[str] = p.column(C.DOC_ID).to_pylist()
        self.passages: list[str] = p.column(C.PASSAGE).to_pylist()

    def score(self, q_emb: np.ndarray, p_emb: np.ndarray) -> float:
        """nDCG@10 from the query [Q, d] and pool [P, d] embeddings (already normalised as the model is)."""
        return retrieval_ndcg(self.query_ids, self.pool_ids, q_emb @ p_emb.T, self.relevant)


def encode_texts(model: Any, texts: Sequence[str], side: str, batch_size: int) -> np.ndarray:
    """[N, d] float32 embeddings of ``texts`` with the student (``BiEncoder.encode``: eval mode, no grad), in
    batches of similar length (longest first), returned in input order."""
    if not texts:
        return np.zeros((0, 0), np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    emb = model.encode([texts[i] for i in order], side, batch_size=batch_size).float().cpu().numpy()  # [N, d]
    out = np.empty_like(emb)
    out[order] = emb
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The stage (driver: orchestration and validation-sized tables only)
# ------------------------------------------------------------------------------------------------
def reusable_teacher(cfg: Any, enc: Any, embedded: Sequence[str]) -> str | None:
    """The dense teacher whose stored vectors are the base student's own (same model and encoding on both
    sides, float32 storage), so the base point needs no encoding; None when there is none."""
    from raymine.encoders import resolve_model_path

    same = ("pooling", "normalize", "query_prompt", "passage_prompt", "query_max_length", "passage_max_length",
            "dtype", "quantize", "trust_remote_code", "append_eos", "mask_leading_special")
    for name in cfg.teachers:
        t = cfg.teacher(name)
        if (t.kind == "dense" and t.storage_dtype == "float32" and name in embedded
                and resolve_model_path(t.model) == resolve_model_path(enc.model)
                and all(getattr(t, f, None) == getattr(enc, f, None) for f in same)):
            return name
    return None


def _take(ds: Any, schema: pa.Schema) -> pa.Table:
    """A small Ray Dataset → one Arrow table (validation-sized), in a fixed order (by the first column)."""
    blocks = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    table = pa.concat_tables([b.select(schema.names).cast(schema) for b in blocks]) if blocks else schema.empty_table()
    return table.sort_by(schema.names[0])


def _embeddings_of(uri: str, id_column: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """{id: vector} for the given (validation-sized) ids of an embedding folder: Ray Data tasks read the parts
    and keep only these rows, so the driver never streams the corpus or the training queries."""
    from raymine import parts
    from raymine.columns import EMBEDDING
    from raymine.embed import arrow_to_embeddings

    ds = parts.read_dataset(uri, [id_column, EMBEDDING]).map_batches(
        _rows_in, batch_format="pyarrow", fn_kwargs={"column": id_column, "wanted": frozenset(ids)})
    out: dict[str, np.ndarray] = {}
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if b.num_rows:
            out.update(zip(b.column(id_column).to_pylist(), arrow_to_embeddings(b.column(EMBEDDING)), strict=True))
    return out


def _ranked(scores: dict[str, float]) -> list[str]:
    """Doc ids by score, ties by id (the search's merge order)."""
    return sorted(scores, key=lambda d: (-scores[d], d))


def _rows_in(batch: pa.Table, column: str, wanted: frozenset[str]) -> pa.Table:
    return batch.filter(pa.array([x in wanted for x in batch.column(column).to_pylist()], pa.bool_()))


def _dev_split(cfg: Any, layout: Any, teacher: str | None, upstream: Any) -> tuple[pa.Table, dict[str, list[str]]]:
    """The dev split's queries (with a judged passage in the corpus) and each one's teacher top-k.

    Queries and qrels are parsed by ingest's own readers; the dev queries are embedded by the teacher's
    actor pool, and their top-k over the corpus embeddings streamed part by part (validation-sized state)."""
    import pyarrow.compute as pc

    from raymine import ingest, parts
    from raymine.ingest import IngestReport

    v, data = cfg.validation, cfg.ingest.data
    files = ingest._input_files(data, "dev")
    report = IngestReport()
    queries = ingest._read_texts(files["queries"], "query", cfg.ingest, report)
    qrels, _ = ingest._read_qrels(files["qrels"], report)
    qrels = qrels.filter(pc.greater(qrels.column(C.SCORE), 0))
    corpus_ids = _take(parts.read_dataset(layout.corpus, [C.DOC_ID]).map_batches(
        _ids_in, batch_format="pyarrow", fn_kwargs={"wanted": frozenset(qrels.column(C.DOC_ID).to_pylist())}),
        pa.schema([(C.DOC_ID, pa.string())])).column(C.DOC_ID).to_pylist()
    known = set(corpus_ids)
    rel: dict[str, list[str]] = {}
    for q, d in zip(qrels.column(C.QUERY_ID).to_pylist(), qrels.column(C.DOC_ID).to_pylist(), strict=True):
        if d in known:
            rel.setdefault(q, [])
            if d not in rel[q]:
                rel[q].append(d)
    text = dict(zip(queries.column(C.QUERY_ID).to_pylist(), queries.column(C.TEXT).to_pylist(), strict=True))
    qids = sorted(q for q in rel if q in text)
    if len(qids) > v.max_queries:  # seeded subsample by id
        h = unit_hash(v.seed, "dev", qids)
        qids = sorted(np.asarray(qids, dtype=object)[np.argsort(h, kind="stable")[: v.max_queries]].tolist())
    table = pa.table({C.QUERY_ID: qids, C.TEXT: [text[q] for q in qids], C.POSITIVE_IDS: [rel[q] for q in qids]},
                     schema=QUERY_SCHEMA)
    cands: dict[str, list[str]] = {q: [] for q in qids}
    if teacher is not None and v.top_k and qids:
        from dataclasses import replace

        import pyarrow.parquet as pq

        from raymine.embed import EmbedInput, embed_tables
        from raymine.evaluate import read_run, search_topk
        from raymine.index import ShardedIndex

        src = layout.path("validation_work", "dev_queries")
        storage.makedirs(src)
        fs, path = storage.resolve(storage.join(src, "part-00000.parquet"))
        pq.write_table(table.select([C.QUERY_ID, C.TEXT]), path, filesystem=fs)
        out = layout.path("validation_work", "embed", "queries")
        embed_tables(cfg.teacher(teacher), cfg.embed, [EmbedInput("query", src, C.QUERY_ID, C.TEXT, out)],
                     layout.path("validation_work", "embed"), upstream)
        # the teacher's exact top-k over its stored corpus vectors: the evaluate stage's sharded search (Ray
        # tasks write the lists as parts; only the dev queries' lists come back, never the corpus)
        search = replace(cfg.search, index_factory="Flat")
        topk_uri = layout.path("validation_work", "topk")
        with ShardedIndex.from_parquet(layout.embed(teacher, "corpus"), search) as index:
            search_topk(index, out, topk_uri, min(v.top_k, index.num_docs), search.search_tasks,
                        search.num_cpus_per_task)
        run = read_run(topk_uri)
        cands = {x: _ranked(run.get(x, {})) for x in qids}
    return table, cands


def _ids_in(batch: pa.Table, wanted: frozenset[str]) -> pa.Table:
    return _rows_in(batch, C.DOC_ID, wanted).select([C.DOC_ID])


def validation_stage(cfg: Any, layout: Any, upstream: Any) -> dict[str, Any]:
    """Choose the validation queries and build their pool under ``OUTPUT/validation``; return the manifest.

    Manifest counts: ``queries``, ``pool``, ``judged``, ``candidates``, ``fill``; ``mode`` ('dev',
    'train_slice' or 'none'), ``share`` (the slice's share of training queries, held out of mining and
    training by :func:`holdout_mask`), ``teacher`` (whose candidates), ``base_score`` (nDCG@10 of the base
    student from the teacher's stored vectors when they are the student's own, else None: the workers
    encode step 0)."""
    from raymine import parts
    from raymine.config import to_dict
    from raymine.ingest import table_files
    from raymine.pipeline import student_encoder

    v, L = cfg.validation, layout
    folder = L.path("validation")
    enc = student_encoder(cfg)
    key = storage.stage_key("validation", to_dict(v), to_dict(enc), cfg.ingest.data, upstream)
    done, run = storage.begin(folder, "validation", key, config=to_dict(v))
    if run is None:
        return done
    has_dev = bool(table_files(cfg.ingest.data, "qrels", "dev")) if v.split in ("auto", "dev") else False
    if v.split == "dev" and not has_dev:
        from raymine.errors import UserError

        raise UserError(f"validation.split=dev: {cfg.ingest.data} has no qrels/dev split; use validation.split="
                        f"train_slice (a held-out share of the training queries) or auto")
    mode = "none" if v.split == "none" else ("dev" if has_dev else "train_slice")
    if mode == "none":
        return run.finish(mode="none", share=0.0, teacher=None, base_score=None)
    embedded = [n for n in cfg.teachers if cfg.teacher(n).kind != "bm25"]  # dense or served
    teacher = next(iter(embedded), None)
    reuse = reusable_teacher(cfg, enc, embedded)
    share = 0.0
    if mode == "train_slice":
        share = slice_share(v.fraction, v.max_queries, parts.num_rows(L.train_queries))
        src = teacher or cfg.teachers[0]
        text = _take(parts.read_dataset(L.train_queries, [C.QUERY_ID, C.TEXT]).map_batches(
            held_out_rows, batch_format="pyarrow", fn_kwargs={"seed": v.seed, "share": share}),
            pa.schema([(C.QUERY_ID, pa.string()), (C.TEXT, pa.string())]))
        found = _take(parts.read_dataset(L.search(src), [C.QUERY_ID, C.POSITIVE_IDS, C.CANDIDATE_IDS]).map_batches(
            held_out_rows, batch_format="pyarrow", fn_kwargs={"seed": v.seed, "share": share}),
            pa.schema([(C.QUERY_ID, pa.string()), (C.POSITIVE_IDS, pa.list_(pa.string())),
                       (C.CANDIDATE_IDS, pa.list_(pa.string()))]))
        pos = dict(zip(found.column(C.QUERY_ID).to_pylist(), found.column(C.POSITIVE_IDS).to_pylist(), strict=True))
        cand_all = dict(zip(found.column(C.QUERY_ID).to_pylist(), found.column(C.CANDIDATE_IDS).to_pylist(),
                            strict=True))
        qids = [q for q in text.column(C.QUERY_ID).to_pylist() if pos.get(q)]
        texts = dict(zip(text.column(C.QUERY_ID).to_pylist(), text.column(C.TEXT).to_pylist(), strict=True))
        queries = pa.table({C.QUERY_ID: qids, C.TEXT: [texts[q] for q in qids], C.POSITIVE_IDS: [pos[q] for q in qids]},
                           schema=QUERY_SCHEMA)
        cands = {q: list(cand_all.get(q) or [])[: v.top_k] for q in qids}
    else:
        queries, cands = _dev_split(cfg, L, teacher, upstream)
    judged = {d for ps in queries.column(C.POSITIVE_IDS).to_pylist() for d in ps}
    wanted = judged | {d for c in cands.values() for d in c}
    n_docs = parts.num_rows(L.corpus)
    fill_share = max(0, v.pool_size - len(wanted)) / max(1, n_docs - len(wanted))
    pool = _take(parts.read_dataset(L.corpus, [C.DOC_ID, C.PASSAGE]).map_batches(
        pool_rows, batch_format="pyarrow", fn_kwargs={"wanted": frozenset(wanted), "seed": v.seed,
                                                      "fill_share": fill_share}), POOL_SCHEMA)
    storage.makedirs(folder)
    import pyarrow.parquet as pq

    for name, table in ((QUERIES_FILE, queries), (POOL_FILE, pool)):
        fs, path = storage.resolve(storage.join(folder, name))
        pq.write_table(table, path, filesystem=fs)
    base = None
    if reuse is not None and queries.num_rows:
        qsrc = L.embed(reuse, "queries") if mode == "train_slice" else L.path("validation_work", "embed", "queries")
        qids = queries.column(C.QUERY_ID).to_pylist()
        pids = pool.column(C.DOC_ID).to_pylist()
        qv, pv = _embeddings_of(qsrc, C.QUERY_ID, qids), _embeddings_of(L.embed(reuse, "corpus"), C.DOC_ID, pids)
        rel = dict(zip(qids, queries.column(C.POSITIVE_IDS).to_pylist(), strict=True))
        base = retrieval_ndcg(qids, pids, np.stack([qv[q] for q in qids]) @ np.stack([pv[d] for d in pids]).T, rel)
    run.counts.update(queries=queries.num_rows, pool=pool.num_rows, judged=len(judged),
                      candidates=len(wanted - judged), fill=pool.num_rows - len(wanted & set(pool.column(C.DOC_ID).to_pylist())))
    log.info("validation (%s): %d queries, pool of %d passages (%d judged, %d teacher candidates, %d random); base "
             "nDCG@10 %s", mode, queries.num_rows, pool.num_rows, len(judged), len(wanted - judged),
             run.counts["fill"], "encoded by the workers" if base is None else f"{100 * base:.2f} (teacher vectors)")
    return run.finish(mode=mode, share=share, teacher=teacher, base_score=base, folder=folder)


__all__ = ["ValidationSet", "best_point", "encode_texts", "held_out_rows", "holdout_mask", "pool_rows",
           "retrieval_ndcg", "reusable_teacher", "slice_share", "unit_hash", "validation_points", "validation_stage"]
