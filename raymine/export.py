"""Export stage: the mined ids joined to passage texts with Ray Data and written by workers in the layouts
that trainers read. The driver only plans the job and sums one row of counts per worker batch.

Data flow (every step a Ray Data operator; no per-query or per-passage object on the driver)::

    mined  --explode_ids-->  (query_id, teacher, role, slot, doc_id)        one row per id in a mined row
           --join(corpus on doc_id, hash-partitioned, left outer)-->  + passage   (null: id not in the corpus)
           --groupby(query_id, teacher).map_groups(regroup_texts)-->  one row per mined row: text lists
    mined  --join(on query_id, teacher, left outer)-->  mined row + its texts
           --map_batches(write_batch)-->  each batch writes one part per format + dropped/; returns its counts

Every mined row is either exported or counted with its reason (``dropped/`` lists them): ``no_query_text``,
``no_positive_text`` (no positive id has a corpus text), ``too_few_negatives`` (fewer negatives with text
than ``export.num_negatives`` when that optional cut is set; else fewer than one). Format-specific:
``no_teacher_scores`` (a format that must carry scores, see below) and, for the n-tuple only,
``short_of_ntuple_width`` (fewer negatives than its fixed number of columns). ``missing_texts`` counts ids without a
corpus text (they are left out of their row; the row itself is kept when it still qualifies).

Layouts (``exports/<format>/part-*.parquet|jsonl``; a part's name is a hash of its rows' keys, so a retried
task rewrites the same file). The jsonl layouts are also written as ONE file, ``exports/<format>.jsonl``
(:func:`concat_parts`, a Ray task per format streaming the parts): NeMo's and FlagEmbedding's loaders open
files. Usage of every layout: ``docs/exports.md``.

- ``st_ntuple`` — sentence-transformers ``(anchor, positive, negative_1..negative_n)``, one row per
  (query, positive), n = every mined negative (``mine.num_negatives``), or the first ``export.num_negatives``
  when that cut is set (rows with fewer are left out of this layout only, counted); optional ``scores`` = [positive,
  negative_1..n] (``export.st_scores``), as ``sentence_transformers.util.mine_hard_negatives(output_format=
  "n-tuple", output_scores=True)`` writes it. Read by ``MultipleNegativesRankingLoss`` (and raymine's train).
- ``st_triplet`` — ``(anchor, positive, negative)``, one row per (query, positive, negative) over all the
  row's negatives; optional ``scores`` = [positive, negative].
- ``st_labeled_pair`` — ``(anchor, document, label)``: label 1 for each positive, 0 for each negative (or
  ``score``, the teacher's score, with ``st_scores``): e.g. ``BinaryCrossEntropyLoss``.
- ``st_labeled_list`` — ``(anchor, documents, labels)``, one row per (query, positive): ``[positive,
  negatives...]`` with labels ``[1, 0, ...]`` (or ``scores``): e.g. ``LambdaLoss``, ``ListNetLoss``.
  (Column names other than the label are free in sentence-transformers; the label column must be one of
  ``label``, ``labels``, ``score``, ``scores`` — its ``DEFAULT_LABEL_COLUMNS``.)
- ``flagembedding`` — FlagEmbedding's fine-tune data, one json line per query:
  ``{"query": str, "pos": [str], "neg": [str], "pos_scores"?: [float], "neg_scores"?: [float], "prompt"?: str,
  "type"?: str}`` (github.com/FlagOpen/FlagEmbedding, examples/finetune/embedder/README.md, "2. Data format";
  its loader ``FlagEmbedding/abc/finetune/embedder/AbsDataset.py`` reads each file with
  ``datasets.load_dataset('json')``). ``pos_scores`` / ``neg_scores`` (indexed like ``pos`` / ``neg``) are
  used with ``--knowledge_distillation True``; ``prompt`` replaces ``--query_instruction_for_retrieval`` for
  that line whenever the key is there, so it is written only when one is set; ``type`` is for bge-en-icl.
- ``nemo`` — NeMo retriever customisation (NeMo Customizer embedding) lines ``{"query": str, "pos_doc": str,
  "neg_doc": [str]}``, one per (query, positive) (docs.nvidia.com/nemo-platform, customizer-reference,
  "Dataset Format Requirements", Embedding Model; NeMo AutoModel's inline retrieval dataset,
  ``make_retrieval_dataset(data_dir_list=[file])``, reads the same form and ``open()``s each path).

Scores: teachers' scales differ (BM25 vs cosine) and an ensembled mined row holds negatives of several
teachers, with positive scores from its first teacher only, so its scores share no scale. A row carries
scores only when its ``teacher`` is exactly ``export.score_teacher`` (default: the first of ``teachers``):
then every positive and negative score came from that one teacher. Other rows: FlagEmbedding writes the
line without score keys (``export.unscored="omit"``, never null: fine without knowledge distillation, which
drops the score columns) or leaves the row out (``"drop"``, counted: every line then has scores, as
knowledge distillation needs); sentence-transformers layouts with ``st_scores`` leave them out (its
collator cannot take a null label). Scores are never re-computed or mixed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymine import columns as C
from raymine import joins, parts, storage
from raymine.config import Config, to_dict
from raymine.ingest import passage_text
from raymine.layout import Layout

log = logging.getLogger(__name__)

ST_FORMATS = ("st_ntuple", "st_triplet", "st_labeled_pair", "st_labeled_list")
JSONL_FORMATS = ("flagembedding", "nemo")
FORMATS = ST_FORMATS + JSONL_FORMATS
ROW_REASONS = ("no_query_text", "no_positive_text", "too_few_negatives")
NO_TEACHER_SCORES = "no_teacher_scores"
SHORT_OF_WIDTH = "short_of_ntuple_width"
FORMAT_REASONS = (NO_TEACHER_SCORES, SHORT_OF_WIDTH)
# CPUs reserved per shuffle aggregator actor (2 joins + 1 groupby, join_partitions each). Ray's own sizing
# (up to 25% of the cluster's CPUs per shuffle) left too little for the 1-CPU read tasks on a 2-CPU node:
# the job hung. The aggregators mostly hold blocks until their partition is complete; memory is sized apart.
AGGREGATOR_CPUS = 0.05
DROPPED = "dropped"  # exports/dropped/: QUERY_ID, TEACHER, REASON, FORMAT (null for row-level reasons)
FORMAT = "format"
DOCUMENT, DOCUMENTS, LABEL, LABELS, SCORE, SCORES = "document", "documents", "label", "labels", "score", "scores"

_KEYS = (C.QUERY_ID, C.TEACHER)  # one mined row (several per query when teachers are not ensembled)
_ROLE, _SLOT = "_role", "_slot"  # 0 = positive, 1 = negative; position in the row's id list
_POS_TEXTS, _NEG_TEXTS = "_positive_texts", "_negative_texts"


@dataclass(frozen=True)
class ExportPlan:
    """The export settings resolved from the whole config (defaults taken from train/teachers); sent to workers."""

    formats: tuple[str, ...]
    min_negatives: int
    ntuple_width: int
    score_teacher: str
    unscored: str
    st_scores: bool
    prompt: str
    data_type: str

    @classmethod
    def from_config(cls, cfg: Config) -> ExportPlan:
        e = cfg.export
        return cls(formats=tuple(dict.fromkeys(e.formats)), min_negatives=e.num_negatives or 1,
                   ntuple_width=e.num_negatives or cfg.mine.num_negatives,
                   score_teacher=e.score_teacher or cfg.teachers[0], unscored=e.unscored, st_scores=e.st_scores,
                   prompt=e.prompt or cfg.train.query_prompt, data_type=e.data_type)


# ------------------------------------------------------------------------------------------------
# Pure steps (pyarrow + Python, no Ray): each one Ray Data operator in export_stage
# ------------------------------------------------------------------------------------------------
def explode_ids(batch: pa.Table) -> pa.Table:
    """Mined rows -> one row per (mined row, positive or negative id): QUERY_ID, TEACHER, _role, _slot, DOC_ID."""
    tables = []
    for role, col in ((0, C.POSITIVE_IDS), (1, C.NEGATIVE_IDS)):
        lists = _combine(batch.column(col))
        parent = pc.list_parent_indices(lists)  # (ids,) row of each id
        offsets = lists.offsets.to_numpy()  # (rows + 1,)
        # position of each id inside its own list: its flat index minus its list's start
        starts = offsets[:-1][parent.to_numpy()] - offsets[0]
        slot = np.arange(len(parent), dtype=np.int64) - starts
        tables.append(pa.table({
            C.QUERY_ID: batch.column(C.QUERY_ID).take(parent).cast(pa.string()),
            C.TEACHER: batch.column(C.TEACHER).take(parent).cast(pa.string()),
            _ROLE: pa.array(np.full(len(parent), role, np.int8)),
            _SLOT: pa.array(slot.astype(np.int32)),
            C.DOC_ID: pc.list_flatten(lists).cast(pa.string()),
        }))
    return pa.concat_tables(tables)


def corpus_passages(batch: pa.Table) -> pa.Table:
    """Corpus rows -> DOC_ID, PASSAGE: the ingest-written passage, or ``ingest.passage_text(title, text)``."""
    ids = batch.column(C.DOC_ID).cast(pa.string())
    if C.PASSAGE in batch.column_names:
        return pa.table({C.DOC_ID: ids, C.PASSAGE: batch.column(C.PASSAGE).cast(pa.string())})
    texts = batch.column(C.TEXT).to_pylist()
    titles = batch.column(C.TITLE).to_pylist() if C.TITLE in batch.column_names else [None] * len(texts)
    return pa.table({C.DOC_ID: ids, C.PASSAGE: pa.array(
        [None if te is None else passage_text(ti, te) for ti, te in zip(titles, texts, strict=True)], pa.string())})


def regroup_texts(group: pa.Table) -> pa.Table:
    """The joined (id, passage) rows of ONE mined row -> one row: QUERY_ID, TEACHER, _positive_texts,
    _negative_texts (lists in the mined id order; null where the id has no corpus text)."""
    qid, teacher = group.column(C.QUERY_ID)[0].as_py(), group.column(C.TEACHER)[0].as_py()
    roles = group.column(_ROLE).to_numpy()
    slots = group.column(_SLOT).to_numpy()
    texts = group.column(C.PASSAGE).to_pylist()
    out: list[list[str | None]] = []
    for role in (0, 1):
        idx = np.nonzero(roles == role)[0]
        order = idx[np.argsort(slots[idx], kind="stable")]
        s = slots[order]
        if len(s) and (len(np.unique(s)) != len(s) or s[-1] != len(s) - 1):
            ids = group.column(C.DOC_ID).to_pylist()
            raise ValueError(f"export: query {qid!r} (teacher {teacher!r}) joined to several texts for one id "
                             f"({sorted(ids[i] for i in order)}): duplicate doc_id in the corpus or duplicate "
                             f"(query_id, teacher) in the mined table")
        out.append([texts[i] for i in order])
    return pa.table({C.QUERY_ID: [qid], C.TEACHER: [teacher],
                     _POS_TEXTS: pa.array([out[0]], pa.list_(pa.string())),
                     _NEG_TEXTS: pa.array([out[1]], pa.list_(pa.string()))})


@dataclass
class _Row:
    """One mined row with its texts, ids without text left out, scores kept aligned."""

    qid: str
    teacher: str
    query: str | None
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None  # None: not all from the score teacher (or not finite)
    neg_scores: list[float] | None
    missing: int  # ids without a corpus text


def _rows(batch: pa.Table, plan: ExportPlan) -> list[_Row]:
    cols = {c: batch.column(c).to_pylist() for c in (*C.MINED_COLUMNS, _POS_TEXTS, _NEG_TEXTS)}
    rows = []
    for i in range(batch.num_rows):
        ids_p, ids_n = cols[C.POSITIVE_IDS][i] or [], cols[C.NEGATIVE_IDS][i] or []
        tx_p = cols[_POS_TEXTS][i] or [None] * len(ids_p)
        tx_n = cols[_NEG_TEXTS][i] or [None] * len(ids_n)
        sc_p, sc_n = cols[C.POSITIVE_SCORES][i], cols[C.NEGATIVE_SCORES][i]
        scored = (cols[C.TEACHER][i] == plan.score_teacher and sc_p is not None and sc_n is not None
                  and len(sc_p) == len(ids_p) and len(sc_n) == len(ids_n)
                  and all(s is not None and math.isfinite(s) for s in (*sc_p, *sc_n)))
        keep_p = [j for j, t in enumerate(tx_p) if t is not None]
        keep_n = [j for j, t in enumerate(tx_n) if t is not None]
        rows.append(_Row(
            qid=cols[C.QUERY_ID][i], teacher=cols[C.TEACHER][i], query=cols[C.QUERY][i],
            pos=[tx_p[j] for j in keep_p], neg=[tx_n[j] for j in keep_n],
            pos_scores=[_round(sc_p[j]) for j in keep_p] if scored else None,
            neg_scores=[_round(sc_n[j]) for j in keep_n] if scored else None,
            missing=len(ids_p) + len(ids_n) - len(keep_p) - len(keep_n)))
    return rows


def row_reason(row: _Row, plan: ExportPlan) -> str | None:
    """Why a mined row is not exported at all (None: it is)."""
    if not row.query:
        return "no_query_text"
    if not row.pos:
        return "no_positive_text"
    if len(row.neg) < plan.min_negatives:
        return "too_few_negatives"
    return None


def format_records(fmt: str, rows: list[_Row], plan: ExportPlan
                   ) -> tuple[list[dict[str, Any]], list[tuple[_Row, str]]]:
    """(records of one layout, (row, reason) left out of it) for exportable rows: reasons ``no_teacher_scores``
    (the layout must carry one teacher's scores) and ``short_of_ntuple_width`` (n-tuple only)."""
    scores_needed = (fmt in ST_FORMATS and plan.st_scores) or (fmt == "flagembedding" and plan.unscored == "drop")
    out: list[dict[str, Any]] = []
    left_out: list[tuple[_Row, str]] = []
    n, with_scores = plan.ntuple_width, fmt in ST_FORMATS and plan.st_scores
    for r in rows:
        if scores_needed and r.pos_scores is None:
            left_out.append((r, NO_TEACHER_SCORES))
            continue
        if fmt == "st_ntuple" and len(r.neg) < n:
            left_out.append((r, SHORT_OF_WIDTH))
            continue
        ps, ns = r.pos_scores or [], r.neg_scores or []
        if fmt == "flagembedding":
            out.append(flagembedding_record(r, plan))
            continue
        for k, p in enumerate(r.pos):
            if fmt == "nemo":
                out.append({"query": r.query, "pos_doc": p, "neg_doc": r.neg})
            elif fmt == "st_ntuple":
                rec = {C.ANCHOR: r.query, C.POSITIVE: p}
                rec.update({C.negative_column(j + 1): r.neg[j] for j in range(n)})
                if with_scores:
                    rec[SCORES] = [ps[k], *ns[:n]]
                out.append(rec)
            elif fmt == "st_triplet":
                for j, d in enumerate(r.neg):
                    rec = {C.ANCHOR: r.query, C.POSITIVE: p, "negative": d}
                    if with_scores:
                        rec[SCORES] = [ps[k], ns[j]]
                    out.append(rec)
            elif fmt == "st_labeled_list":
                rec = {C.ANCHOR: r.query, DOCUMENTS: [p, *r.neg]}
                rec[SCORES if with_scores else LABELS] = [ps[k], *ns] if with_scores else [1] + [0] * len(r.neg)
                out.append(rec)
            elif fmt == "st_labeled_pair":
                out.append({C.ANCHOR: r.query, DOCUMENT: p, **({SCORE: ps[k]} if with_scores else {LABEL: 1})})
            else:
                raise ValueError(f"unknown export format {fmt!r}; known: {list(FORMATS)}")
        if fmt == "st_labeled_pair":  # negatives once per query, not once per positive
            for j, d in enumerate(r.neg):
                out.append({C.ANCHOR: r.query, DOCUMENT: d, **({SCORE: ns[j]} if with_scores else {LABEL: 0})})
    return out, left_out


def flagembedding_record(r: _Row, plan: ExportPlan) -> dict[str, Any]:
    """One FlagEmbedding line. Keys without a value are left out, never null: a ``prompt`` key (even empty)
    replaces ``--query_instruction_for_retrieval``, and null scores fail ``--knowledge_distillation``."""
    rec: dict[str, Any] = {"query": r.query, "pos": r.pos, "neg": r.neg}
    if r.pos_scores is not None and r.neg_scores is not None:
        rec.update(pos_scores=r.pos_scores, neg_scores=r.neg_scores)
    if plan.prompt:
        rec["prompt"] = plan.prompt
    if plan.data_type:
        rec["type"] = plan.data_type
    return rec


def format_schema(fmt: str, plan: ExportPlan) -> pa.Schema | None:
    """Parquet schema of a sentence-transformers layout (None for the jsonl layouts)."""
    s, f32 = pa.string(), pa.float32()
    sc = plan.st_scores
    if fmt == "st_ntuple":
        fields = [(C.ANCHOR, s), (C.POSITIVE, s)] + [(C.negative_column(j + 1), s) for j in range(plan.ntuple_width)]
        return pa.schema(fields + ([(SCORES, pa.list_(f32))] if sc else []))
    if fmt == "st_triplet":
        return pa.schema([(C.ANCHOR, s), (C.POSITIVE, s), ("negative", s)] + ([(SCORES, pa.list_(f32))] if sc else []))
    if fmt == "st_labeled_pair":
        return pa.schema([(C.ANCHOR, s), (DOCUMENT, s), (SCORE, f32) if sc else (LABEL, pa.int8())])
    if fmt == "st_labeled_list":
        return pa.schema([(C.ANCHOR, s), (DOCUMENTS, pa.list_(s)),
                          (SCORES, pa.list_(f32)) if sc else (LABELS, pa.list_(pa.int8()))])
    return None


def count_columns(plan: ExportPlan) -> list[str]:
    """Names of the per-batch count columns (``write_batch``'s output), the same for every batch."""
    cols = ["mined_rows", "exported_rows", "missing_texts", *ROW_REASONS]
    for fmt in plan.formats:
        cols += [f"{fmt}.records", f"{fmt}.rows", *(f"{fmt}.{why}" for why in FORMAT_REASONS)]
    return cols


def write_batch(batch: pa.Table, plan: ExportPlan, root: str) -> pa.Table:
    """Worker step: one batch of mined rows with texts -> one part per format (+ dropped/) under ``root``.

    Returns one row of counts (``count_columns``): the driver sums these rows, nothing else comes back.
    """
    rows = _rows(batch, plan)
    reasons = [row_reason(r, plan) for r in rows]
    ok = [r for r, why in zip(rows, reasons, strict=True) if why is None]
    counts = dict.fromkeys(count_columns(plan), 0)
    counts.update(mined_rows=len(rows), exported_rows=len(ok), missing_texts=sum(r.missing for r in rows))
    for why in reasons:
        if why is not None:
            counts[why] += 1
    name = _part_name(batch)
    dropped = [(r.qid, r.teacher, why, None) for r, why in zip(rows, reasons, strict=True) if why is not None]
    for fmt in plan.formats:
        records, left_out = format_records(fmt, ok, plan)
        counts[f"{fmt}.records"] = len(records)
        counts[f"{fmt}.rows"] = len(ok) - len(left_out)
        for r, why in left_out:
            counts[f"{fmt}.{why}"] += 1
            dropped.append((r.qid, r.teacher, why, fmt))
        if records:
            _write_records(fmt, records, plan, storage.join(root, fmt, name))
    if dropped:
        q, t, why, fmt_ = zip(*dropped, strict=True)
        table = pa.table({C.QUERY_ID: pa.array(q, pa.string()), C.TEACHER: pa.array(t, pa.string()),
                          C.REASON: pa.array(why, pa.string()), FORMAT: pa.array(fmt_, pa.string())})
        _write_parquet(table, storage.join(root, DROPPED, name + ".parquet"))
    return pa.table({k: pa.array([v], pa.int64()) for k, v in counts.items()})


def _write_records(fmt: str, records: list[dict[str, Any]], plan: ExportPlan, stem: str) -> None:
    schema = format_schema(fmt, plan)
    if schema is not None:
        _write_parquet(pa.Table.from_pylist(records, schema=schema), stem + ".parquet")
        return
    lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    storage.write_bytes(stem + ".jsonl", lines.encode("utf-8"))


def _write_parquet(table: pa.Table, uri: str) -> None:
    import pyarrow.parquet as pq

    storage.makedirs(_parent(uri))
    fs, path = storage.resolve(uri)
    with fs.open_output_stream(path) as sink:
        pq.write_table(table, sink)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _part_name(batch: pa.Table) -> str:
    """``part-<hash of the batch's sorted row keys>``: a retried task rewrites the same files."""
    keys = sorted(f"{q}\x1f{t}" for q, t in zip(batch.column(C.QUERY_ID).to_pylist(),
                                               batch.column(C.TEACHER).to_pylist(), strict=True))
    return "part-" + hashlib.sha1("\x1e".join(keys).encode("utf-8")).hexdigest()[:20]


def concat_parts(folder: str, dest: str) -> int:
    """Ray task: the ``*.jsonl`` parts directly in ``folder`` (name order) streamed into the one file ``dest``
    (written beside it as ``dest.tmp``, then moved: a reader never sees half a file). Returns its bytes.

    The consumers open files, not folders: NeMo AutoModel's inline retrieval loader ``open()``s each path of
    ``data_dir_list``; FlagEmbedding's ``--train_data`` takes a file (a folder is read file by file, and its
    per-file checks would see parts with and without score keys as different datasets)."""
    names = sorted(n for n in storage.list_files(folder) if n.endswith(".jsonl") and "/" not in n and "\\" not in n)
    storage.makedirs(_parent(dest))
    fs, path = storage.resolve(dest + ".tmp")
    total = 0
    with fs.open_output_stream(path) as out:
        for n in names:
            src_fs, src = storage.resolve(storage.join(folder, n))
            with src_fs.open_input_stream(src) as f:
                while chunk := f.read(8 << 20):
                    out.write(chunk)
                    total += len(chunk)
    fs.move(path, storage.resolve(dest)[1])
    return total


def _round(x: float) -> float:
    """float32 scores as their shortest decimal (0.8123457, not 0.8123456835746765)."""
    return float(f"{x:.7g}")


def _combine(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
def corpus_uri(layout: Layout) -> str:
    """The ingest corpus: the ``ingest/corpus/`` folder, or the single-file ``ingest/corpus.parquet``."""
    for uri in (layout.corpus, layout.corpus + ".parquet"):
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"export: no corpus at {layout.corpus} (folder) or {layout.corpus}.parquet")


def _upstream(stage_dir: str) -> Any:
    """The key and finish time of the stage that wrote an input (None when it has no manifest)."""
    uri = storage.join(stage_dir, storage.MANIFEST)
    if not storage.exists(uri):
        return None
    m = storage.read_json(uri)
    return [m.get("key"), m.get("finished_at")]


def export_stage(cfg: Config, layout: Layout) -> dict:
    """Join the mined table (``layout.mined``) to the corpus texts and write ``cfg.export.formats`` under
    ``layout.exports``; returns the manifest (skipped when done with the same config and inputs).

    ``counts``: ``mined_rows`` = ``exported_rows`` + the row-level reasons (``no_query_text``,
    ``no_positive_text``, ``too_few_negatives``); ``missing_texts``; per format ``rows`` (mined rows in it),
    ``records`` (lines / Parquet rows written), ``no_teacher_scores``, ``short_of_ntuple_width`` and ``path``.
    """
    import ray.data

    plan = ExportPlan.from_config(cfg)
    corpus = corpus_uri(layout)
    key = storage.stage_key("export", to_dict(plan), cfg.export.join_partitions, layout.mined, corpus,
                            _upstream(layout.mine), _upstream(layout.ingest))
    done, run = storage.begin(layout.exports, "export", key, config=to_dict(cfg.export))
    if done is not None:
        return done
    assert run is not None
    counts = dict.fromkeys(count_columns(plan), 0)
    ctx = ray.data.DataContext.get_current()  # every Dataset built below copies it (the groupby's shuffle)
    saved, ctx.hash_shuffle_operator_actor_num_cpus_override = (ctx.hash_shuffle_operator_actor_num_cpus_override,
                                                                AGGREGATOR_CPUS)
    try:
        _run_export(cfg, layout, plan, corpus, counts)
    finally:
        ctx.hash_shuffle_operator_actor_num_cpus_override = saved
    files = _single_files(layout.exports, plan.formats)
    dropped = {r: counts[r] for r in ROW_REASONS}
    if counts["exported_rows"] + sum(dropped.values()) != counts["mined_rows"]:
        raise RuntimeError(f"export: accounting mismatch {counts}")
    run.counts = {
        "mined_rows": counts["mined_rows"], "exported_rows": counts["exported_rows"], "dropped": dropped,
        "missing_texts": counts["missing_texts"], "min_negatives": plan.min_negatives,
        "ntuple_width": plan.ntuple_width, "score_teacher": plan.score_teacher,
        "formats": {fmt: {"rows": counts[f"{fmt}.rows"], "records": counts[f"{fmt}.records"],
                          **{why: counts[f"{fmt}.{why}"] for why in FORMAT_REASONS},
                          "path": storage.join(layout.exports, fmt),
                          **({"file": files[fmt]} if fmt in files else {})} for fmt in plan.formats},
    }
    return run.finish(dropped_path=storage.join(layout.exports, DROPPED))


def _single_files(exports: str, formats: tuple[str, ...]) -> dict[str, str]:
    """``exports/<format>.jsonl`` for each jsonl layout: its parts concatenated by one Ray task per format."""
    import ray

    files = {f: storage.join(exports, f + ".jsonl") for f in formats if f in JSONL_FORMATS}
    task = ray.remote(num_cpus=0.25, max_retries=3)(concat_parts)
    ray.get([task.remote(storage.join(exports, f), uri) for f, uri in files.items()])
    return files


def _texts_bytes(layout: Layout, corpus: str, corpus_bytes: int, mined_rows: int, num_negatives: int) -> int:
    """Estimated bytes of the export's id → text join: one passage (the corpus's mean bytes on disk per passage)
    per mined id — each row's negatives and about one positive. It decides, with the inputs' size, whether the
    join runs in one task: the joined texts outgrow the id tables by far (a 50k-passage corpus with 200k mined
    queries: under 64 MiB of inputs, 3.6 GB in the one task)."""
    docs = parts.manifest_rows(corpus, storage.join(layout.ingest, storage.MANIFEST), "docs")
    return int(mined_rows * (num_negatives + 1) * corpus_bytes / max(1, docs))


def _run_export(cfg: Config, layout: Layout, plan: ExportPlan, corpus: str, counts: dict[str, int]) -> None:
    """The Ray Data job; adds the workers' per-batch counts (one row per batch) into ``counts``."""
    mined_rows = parts.manifest_rows(layout.mined, storage.join(layout.mine, storage.MANIFEST), "mined", "mined")
    if not mined_rows:
        return
    agg = {"num_cpus": AGGREGATOR_CPUS}
    names = parts.schema(corpus).names
    cols = [C.DOC_ID, *([C.PASSAGE] if C.PASSAGE in names else [c for c in (C.TITLE, C.TEXT) if c in names])]
    passages = parts.read_dataset(corpus, cols).map_batches(corpus_passages, batch_format="pyarrow")
    mined = parts.read_dataset(layout.mined, C.MINED_COLUMNS)
    ids = mined.map_batches(explode_ids, batch_format="pyarrow")
    corpus_bytes = joins.input_bytes([corpus])  # listed once: the join's size and the texts' estimate
    local, nparts = joins.plan_bytes(
        joins.input_bytes([layout.mined]) + corpus_bytes, cfg.export.join_partitions,
        output_bytes=_texts_bytes(layout, corpus, corpus_bytes, mined_rows, cfg.mine.num_negatives))
    joined = joins.join(ids, passages, "left_outer", nparts, (C.DOC_ID,), local, aggregator_ray_remote_args=agg)
    texts = joined.groupby(list(_KEYS), num_partitions=nparts).map_groups(regroup_texts, batch_format="pyarrow")
    full = joins.join(mined, texts, "left_outer", nparts, _KEYS, local, aggregator_ray_remote_args=agg)
    out = full.map_batches(write_batch, batch_format="pyarrow",
                           batch_size=parts.bounded_batch(mined_rows, cfg.export.rows_per_part),
                           fn_kwargs={"plan": plan, "root": layout.exports})
    for row in out.take_all():
        for k in counts:
            counts[k] += int(row[k])
